"""Dynamic-resolution rendering at the edges: truncation never inside an image span, and bad input
(an image longer than max_length, an image the processor rejects, markers != images, an unsupported
family, a teacher/student vocabulary mismatch) gives a counted skip or a clear error."""

import pytest
import torch
from PIL import Image

from taid_vlm.data import Renderer, Sample, SampleError, collate
from taid_vlm.models import build_model, check_vocab_compatible
from taid_vlm.models.tiny_family_tokenizers import build_family_tokenizer

from hf_family_helpers import model_cfg, photo
from models_helpers import one_torch_thread  # noqa: F401

TWO_TURNS = [{"role": "user", "content": "<image>What color?"}, {"role": "assistant", "content": "red circle"},
             {"role": "user", "content": "<image>And this one?"}, {"role": "assistant", "content": "blue"}]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen")
    build_family_tokenizer("qwen2_5_vl", save_dir=folder)
    return build_model(model_cfg("qwen2_5_vl", folder))


def spans(ids, start_id, end_id):
    starts = [k for k, t in enumerate(ids) if t == start_id]
    return [(s, ids.index(end_id, s) + 1) for s in starts]


def test_a_cut_inside_an_image_span_drops_that_image_and_the_text_after_it(qwen):
    tok = qwen.tokenizer
    vs, ve = tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>")
    sample = Sample(key="k", images=[photo(1, 60, 60), photo(2, 100, 80)], messages=TWO_TURNS)
    full = Renderer(qwen.input_spec, 4096)(sample)
    (a0, a1), (b0, b1) = spans(full.input_ids, vs, ve)
    assert full.image_inputs["image_grid_thw"].shape[0] == 2 and not full.truncated
    for max_length in (b0 + 1, (b0 + b1) // 2, b1 - 1):  # every cut inside the second span
        r = Renderer(qwen.input_spec, max_length)(sample)
        assert r.truncated and r.input_ids == full.input_ids[:b0] and r.labels == full.labels[:b0]
        assert r.image_inputs["image_grid_thw"].tolist() == full.image_inputs["image_grid_thw"][:1].tolist()
        rows = int(full.image_inputs["image_grid_thw"][0].prod())
        assert torch.equal(r.image_inputs["pixel_values"], full.image_inputs["pixel_values"][:rows])
        batch = collate([r], tok.pad_token_id)
        with torch.no_grad():  # the model accepts it: placeholders and images agree
            qwen(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"])
    r = Renderer(qwen.input_spec, b1 + 2)(sample)  # a cut after the span keeps both images
    assert r.truncated and r.input_ids == full.input_ids[:b1 + 2] and r.image_inputs["image_grid_thw"].shape[0] == 2


def test_bad_images_and_markers_are_counted_skips(qwen):
    sample = Sample(key="k", images=[photo(1, 60, 60), photo(2, 100, 80)], messages=TWO_TURNS)
    full = Renderer(qwen.input_spec, 4096)(sample)
    first = full.input_ids.index(qwen.tokenizer.convert_tokens_to_ids("<|vision_end|>")) + 1
    with pytest.raises(SampleError, match="an image takes") as e:
        Renderer(qwen.input_spec, first - 3)(sample)  # the first image's span alone is longer
    assert e.value.reason == "too_long"
    with pytest.raises(SampleError) as e:
        Renderer(qwen.input_spec, 4096)(Sample(key="k", images=[photo(1, 60, 60)], messages=TWO_TURNS))
    assert e.value.reason == "marker_mismatch"
    sliver = Image.new("RGB", (2000, 4))  # aspect ratio 500: Qwen's processor refuses it
    with pytest.raises(SampleError, match="aspect ratio") as e:
        Renderer(qwen.input_spec, 4096)(Sample(key="k", images=[photo(1, 60, 60), sliver], messages=TWO_TURNS))
    assert e.value.reason == "image_rejected"


def test_an_unsupported_family_lists_the_supported_ones(tmp_path):
    build_family_tokenizer("qwen2_vl", save_dir=tmp_path)
    with pytest.raises(ValueError, match=r"'blip_2' is not a supported.*qwen2_5_vl.*'llava' with a fixed"):
        build_model({"type": "hf_vlm", "tokenizer": {"path": str(tmp_path)}, "config": {"model_type": "blip_2"}})
    with pytest.raises(ValueError, match="tokens_per_image: not used"):
        build_model(model_cfg("qwen2_vl", tmp_path, tokens_per_image=4))


def test_a_vocabulary_mismatch_names_both_sizes_and_the_first_differing_token(qwen, tmp_path):
    from taid_vlm.tokenizer import build_tiny_tokenizer

    other = build_model({"type": "causal_lm", "tokenizer": {"builtin": "tiny"},
                         "llm": {"config": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
                                            "num_hidden_layers": 1, "num_attention_heads": 4,
                                            "num_key_value_heads": 2}}})
    n_t, n_s = len(qwen.tokenizer), len(build_tiny_tokenizer())
    with pytest.raises(ValueError, match=rf"{n_t} tokens.*{n_s} tokens.*first differing token: id \d+ is"):
        check_vocab_compatible(qwen, other)


def test_image_processor_overrides_apply_to_a_processor_from_a_folder(qwen, tmp_path):
    qwen.hf.save_pretrained(tmp_path)
    qwen.processor.save_pretrained(tmp_path)
    small = {"size": {"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 4}}
    model = build_model({"type": "hf_vlm", "path": str(tmp_path), "image_processor": small})
    img = photo(1, 100, 140)
    default = qwen.input_spec.image_processor([img]).tensors["image_grid_thw"][0].tolist()
    got = model.input_spec.image_processor([img]).tensors["image_grid_thw"][0].tolist()
    assert got[1] * got[2] <= 16 < default[1] * default[2]
    assert model.processor.image_processor.size == small["size"]
