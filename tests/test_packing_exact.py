"""Packed rows are exact: every document of a packed row gives the hidden states, loss and gradients
it gives alone (fp32, 1e-5), for every model type and attention implementation packing accepts; the
rest is refused before a step."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import taid_vlm.models.packing as packing
from taid_vlm.config import ConfigError, load_config
from taid_vlm.data import Rendered, collate, collate_packed
from taid_vlm.losses import OnlineTeacher, build_loss
from taid_vlm.models import build_model
from taid_vlm.train.objective import hidden_at
from taid_vlm.train.trainer import build_models

from models_helpers import load_cfg, one_torch_thread  # noqa: F401  (fixture)

CPU_ATTENTION = ("sdpa", "eager")
LENGTHS = [[7, 12, 5], [9, 3]]  # two rows of documents; the second row ends in padding
TOL = 1e-5


def tiny_lm(model_type: str, attn: str, hidden: int = 64, layers: int = 2, seed: int = 0):
    cfg = copy.deepcopy(load_cfg("tiny_text_student"))
    cfg["llm"]["config"].update(model_type=model_type, hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=layers, head_dim=hidden // 4)
    cfg["llm"]["attn_implementation"] = attn
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def documents(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in LENGTHS:
        row = []
        for n in lengths:
            ids = torch.randint(4, vocab, (n,), generator=g).tolist()
            labels = [-100] * (n // 3) + ids[n // 3:]  # a prompt, then supervised tokens
            row.append(Rendered(ids, labels))
        rows.append(row)
    return rows


@torch.no_grad()
def max_packed_vs_alone(model, rows, batch) -> float:
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], position_ids=batch["position_ids"])
    worst = 0.0
    for b, row in enumerate(rows):
        at = 0
        for d in row:
            alone = model.hidden_states(torch.tensor([d.input_ids]))[0]
            worst = max(worst, float((hidden[b, at:at + len(d)] - alone).abs().max()))
            at += len(d)
    return worst


@pytest.mark.parametrize("attn", CPU_ATTENTION)
@pytest.mark.parametrize("model_type", packing.PACKABLE_MODEL_TYPES)
def test_packed_hidden_states_loss_and_grads_equal_alone(model_type, attn):
    student = tiny_lm(model_type, attn)
    teacher = tiny_lm(model_type, attn, hidden=96, layers=3, seed=1)
    pad = student.tokenizer.pad_token_id
    rows = documents(len(student.tokenizer))
    batch = collate_packed(rows, pad)
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # a pad tail is exercised

    # hidden states of every document, packed vs alone
    diff = max_packed_vs_alone(student, rows, batch)
    print(f"{model_type}/{attn}: packed vs alone max |diff| = {diff:.3g}")
    assert diff < TOL, f"{model_type}/{attn}: packed documents differ from alone by {diff:.3g}"

    # the chunked loss and its gradients: one packed batch vs the documents one by one, same token order
    loss_fn = build_loss("taid", t_start=0.4, t_end=1.0)
    alone = [collate([d], pad) for row in rows for d in row]
    assert torch.equal(batch["loss_targets"], torch.cat([a["loss_targets"] for a in alone]))

    def loss_and_grads(batches):
        student.zero_grad()
        h_s = torch.cat([hidden_at(student, x) for x in batches])
        with torch.no_grad():
            h_t = torch.cat([hidden_at(teacher, x) for x in batches])
        targets = torch.cat([x["loss_targets"] for x in batches])
        loss = loss_fn.fused(h_s, student.output_weight(), OnlineTeacher(h_t, teacher.output_weight()), labels=targets,
                             chunk_size=8)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    loss_packed, grads_packed = loss_and_grads([batch])
    loss_alone, grads_alone = loss_and_grads(alone)
    assert abs(float(loss_packed - loss_alone)) < TOL, (float(loss_packed), float(loss_alone))
    for name, g in grads_alone.items():
        assert torch.allclose(grads_packed[name], g, atol=TOL, rtol=0), name


def test_composed_vlm_packed_text_rows_equal_alone():
    """A composed VLM (type composed) on packed text-only rows: its LM isolates the documents too."""
    model = build_model(load_cfg("tiny_vlm_student")).eval()
    rows = documents(len(model.tokenizer))
    batch = collate_packed(rows, model.tokenizer.pad_token_id)
    packing.check_packable(model, "student.model")
    assert max_packed_vs_alone(model, rows, batch) < TOL


def test_old_all_ones_mask_leaked_and_flash_layout_is_exact(monkeypatch):
    """The path packing replaced (an all-ones 2-D mask with the position ids) let documents attend to
    each other; the one-row layout used for flash-attention varlen (rows end to end) is exact too."""
    model = tiny_lm("qwen2", "sdpa")
    rows = documents(len(model.tokenizer))
    batch = collate_packed(rows, model.tokenizer.pad_token_id)
    with torch.no_grad():
        embeds = model.llm.get_input_embeddings()(batch["input_ids"])
        leaked = model.llm.base_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                      position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        fixed = model.hidden_states(batch["input_ids"], batch["attention_mask"], position_ids=batch["position_ids"])
    before = float((leaked - fixed).abs().max())
    print(f"packed vs alone, old all-ones mask: max |diff| = {before:.3g}")
    assert before > 1e-2

    monkeypatch.setattr(packing, "_ONE_ROW_ATTENTION", ("sdpa",))
    diff = max_packed_vs_alone(model, rows, batch)
    print(f"packed vs alone, rows end to end (flash layout, under sdpa): max |diff| = {diff:.3g}")
    assert diff < TOL


def test_packing_refuses_what_it_cannot_isolate():
    with pytest.raises(ValueError, match="attn_implementation 'flex_attention'"):
        packing.check_packable(tiny_lm("qwen2", "flex_attention"), "student.model")
    gemma = tiny_lm("gemma", "sdpa")
    with pytest.raises(ValueError, match="student.model: data.pack: model type 'gemma'"):
        packing.check_packable(gemma, "student.model")
    with pytest.raises(ValueError, match="model type 'gemma'"):  # the forward refuses too
        gemma.hidden_states(torch.tensor([[5, 6, 7, 8]]), position_ids=torch.tensor([[0, 1, 0, 1]]))
    with pytest.raises(ValueError, match="right-padded"):
        tiny_lm("qwen2", "sdpa").hidden_states(torch.tensor([[5, 6, 7]]), torch.tensor([[0, 1, 1]]),
                                               position_ids=torch.tensor([[0, 0, 1]]))


def test_trainer_refuses_packing_for_an_unsupported_model_at_build(tmp_path):
    import yaml

    configs = Path(__file__).resolve().parents[1] / "configs"
    raw = yaml.safe_load((configs / "tiny_text.yaml").read_text())
    student = load_cfg("tiny_text_student")
    student["llm"]["config"].update(model_type="gemma", head_dim=16)
    raw.update(config_dir=str(configs), output_dir=str(tmp_path), student={"model": student})
    raw["data"]["pack"] = True
    with pytest.raises(ConfigError, match="student.model: data.pack: model type 'gemma'"):
        build_models(load_config(data=raw))
