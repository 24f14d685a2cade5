"""Composed VLM: the image splice, multi-image order, count errors, the hidden-state/logit contract, dtype."""

import re

import pytest
import torch

from taid_vlm.models import build_model

from models_helpers import interleaved_batch, load_cfg, one_torch_thread, with_changes  # noqa: F401


@pytest.fixture(scope="module", params=["tiny_vlm_teacher", "tiny_vlm_student"])
def model(request):
    torch.manual_seed(0)
    return build_model(load_cfg(request.param), role="student")


def hand_splice(model, input_ids, pixel_values, blocks):
    """The reference: loop over images and write their tokens at the recorded placeholder runs."""
    embeds = model.llm.get_input_embeddings()(input_ids).detach().clone()
    feats = model.image_embeddings(pixel_values).detach()
    k = model.input_spec.tokens_per_image
    for img, (s, start) in enumerate(blocks):
        embeds[s, start:start + k] = feats[img]
    return embeds


def test_input_spec_matches_architecture(model):
    spec = model.input_spec
    assert spec.is_multimodal
    assert spec.image_token == "<image>"
    assert spec.image_token_id == model.tokenizer.convert_tokens_to_ids("<image>")
    grid = model.vision.grid
    expected = grid[0] * grid[1] // (4 if model.model_config["projector"]["type"] == "pixel_shuffle_mlp" else 1)
    assert spec.tokens_per_image == expected
    assert model.image_embeddings(torch.zeros(1, 3, *model.vision.image_size)).shape == (
        1, expected, model.llm.config.hidden_size)


def test_image_embeddings_land_exactly_at_placeholders(model):
    ids, mask, pixels, blocks = interleaved_batch(model, images_per_sample=(1, 2))
    with torch.no_grad():
        got = model.embed_inputs(ids, pixels)
        ref = hand_splice(model, ids, pixels, blocks)
        assert torch.equal(got, ref)
        # text positions keep their token embeddings untouched
        text = ids != model.input_spec.image_token_id
        assert torch.equal(got[text], model.llm.get_input_embeddings()(ids)[text])
        # and the whole forward equals the HF LM run on the hand-spliced embeddings
        hf_logits = model.llm(inputs_embeds=ref, attention_mask=mask).logits
        assert torch.allclose(model(ids, mask, pixel_values=pixels), hf_logits, atol=1e-5, rtol=1e-5)


def test_multi_image_order_is_sample_major(model):
    ids, mask, pixels, blocks = interleaved_batch(model, images_per_sample=(2, 1))
    k = model.input_spec.tokens_per_image
    with torch.no_grad():
        got = model.embed_inputs(ids, pixels)
        for img, (s, start) in enumerate(blocks):
            alone = model.image_embeddings(pixels[img:img + 1])[0]
            assert torch.allclose(got[s, start:start + k], alone, atol=1e-5), f"image {img} misplaced"
        # swapping the first two images swaps their blocks, nothing else moves
        swapped = model.embed_inputs(ids, pixels[[1, 0, 2]])
        (s0, a), (s1, b), (s2, c) = blocks
        assert torch.equal(swapped[s0, a:a + k], got[s1, b:b + k])
        assert torch.equal(swapped[s1, b:b + k], got[s0, a:a + k])
        assert torch.equal(swapped[s2, c:c + k], got[s2, c:c + k])
        assert not torch.equal(got[s0, a:a + k], got[s1, b:b + k])


def test_placeholder_count_mismatch_names_both_counts(model):
    ids, mask, pixels, _ = interleaved_batch(model, images_per_sample=(1, 2))
    k = model.input_spec.tokens_per_image
    with pytest.raises(ValueError, match=rf"{3 * k} placeholder tokens.*2 images x {k} tokens per image = {2 * k}"):
        model(ids, mask, pixel_values=pixels[:2])
    with pytest.raises(ValueError, match=rf"{3 * k} placeholder tokens.*0 images"):
        model(ids, mask)
    short = ids.clone()
    short[0, (short[0] == model.input_spec.image_token_id).nonzero()[0]] = 5  # one placeholder lost
    with pytest.raises(ValueError, match=rf"{3 * k - 1} placeholder tokens.*= {3 * k}"):
        model(short, mask, pixel_values=pixels)
    text_only = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match=re.escape(f"0 placeholder tokens (id {model.input_spec.image_token_id})")):
        model(text_only, torch.ones_like(text_only), pixel_values=pixels[:1])


def test_hidden_states_times_output_weight_is_logits(model):
    ids, mask, pixels, _ = interleaved_batch(model)
    with torch.no_grad():
        h = model.hidden_states(ids, mask, pixel_values=pixels)
        logits = model(ids, mask, pixel_values=pixels)
        assert h.shape == (*ids.shape, model.llm.config.hidden_size)
        assert model.output_weight().shape == (model.vocab_size, h.shape[-1])
        assert logits.shape == (*ids.shape, model.vocab_size)
        torch.testing.assert_close(h @ model.output_weight().T, logits, rtol=1e-6, atol=1e-6)
        # h is the input of lm_head: after the final norm, i.e. what HF's own forward feeds its head
        hf = model.llm(inputs_embeds=model.embed_inputs(ids, pixels), attention_mask=mask).logits
        torch.testing.assert_close(logits, hf, rtol=1e-5, atol=1e-5)


def test_position_ids_are_passed_through(model):
    ids, mask, pixels, _ = interleaved_batch(model, images_per_sample=(1, 1))
    with torch.no_grad():
        default = model.hidden_states(ids, mask, pixel_values=pixels)
        explicit = model.hidden_states(ids, mask, pixel_values=pixels,
                                       position_ids=torch.arange(ids.shape[1]).expand_as(ids))
        # RoPE is relative, so only a reset (as packing does) changes anything, and only after the reset
        half = ids.shape[1] // 2
        reset = torch.cat([torch.arange(half), torch.arange(ids.shape[1] - half)]).expand_as(ids)
        restarted = model.hidden_states(ids, mask, pixel_values=pixels, position_ids=reset)
    torch.testing.assert_close(default, explicit)
    torch.testing.assert_close(default[:, :half], restarted[:, :half])
    assert not torch.allclose(default[:, half:], restarted[:, half:], atol=1e-4)


def test_bf16_model_casts_float32_pixels():
    model = build_model(with_changes(load_cfg("tiny_vlm_student"), dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids, mask, pixels, _ = interleaved_batch(model)
    assert pixels.dtype == torch.float32
    h = model.hidden_states(ids, mask, pixel_values=pixels)
    assert h.dtype == torch.bfloat16 and torch.isfinite(h.float()).all()
    logits = model(ids, mask, pixel_values=pixels)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    assert model.projector.mlp[1].weight.grad is not None


def test_text_only_batch_can_still_run_vision_for_zero3():
    model = build_model(load_cfg("tiny_vlm_student"), role="student")
    model.freeze([])  # nothing frozen: every parameter must receive a gradient
    for p in model.vision.parameters():
        p.requires_grad_(True)
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    plain = model(ids, mask)
    assert model.projector.mlp[1].weight.grad is None
    model.run_vision_without_images = True
    with_dummy = model(ids, mask)
    assert torch.equal(plain, with_dummy)
    with_dummy.sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
    assert torch.count_nonzero(model.projector.mlp[1].weight.grad) == 0
