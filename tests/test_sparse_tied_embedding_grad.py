"""A tied student's embedding backward is made sparse (train/objective.py): the gradients must be those of
the dense backward, W.grad must stay one dense tensor, and the dense [V, H] embedding backward must be gone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from taid_vlm.losses import OnlineTeacher, build_loss
from taid_vlm.models import build_model
from taid_vlm.train.objective import DistillationObjective

from models_helpers import interleaved_batch, load_cfg


def _inputs(model):
    if model.kind == "composed":
        ids, mask, pixels, _ = interleaved_batch(model)
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(10, model.vocab_size, (2, 24), generator=g)
        mask, pixels = torch.ones_like(ids), None
    positions = torch.nonzero(mask.flatten()[1:]).flatten()  # position p predicts token p + 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
            "loss_positions": positions, "loss_targets": ids.flatten()[positions + 1]}


def _step(objective, inputs, teacher, micro_batches=2):
    """Two micro-batches accumulated, as the trainer does (the second adds into an existing W.grad)."""
    objective.zero_grad(set_to_none=True)
    for _ in range(micro_batches):
        objective(inputs, teacher, denominator=float(len(inputs["loss_positions"]))).backward()
    return {n: p.grad for n, p in objective.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["tiny_text_student", "tiny_vlm_student"])
def test_sparse_embedding_backward_gives_the_dense_gradients(name):
    torch.manual_seed(0)
    student = build_model(load_cfg(name))
    student.train()
    inputs = _inputs(student)
    g = torch.Generator().manual_seed(1)
    n, h = len(inputs["loss_positions"]), 32
    teacher = OnlineTeacher(torch.randn(n, h, generator=g), torch.randn(student.vocab_size, h, generator=g))

    dense = DistillationObjective(copy.deepcopy(student), build_loss("fkl"), student.vocab_size, zero_stage=3)
    sparse = DistillationObjective(copy.deepcopy(student), build_loss("fkl"), student.vocab_size, zero_stage=0)
    assert not dense.sparse_embedding_grad and sparse.sparse_embedding_grad
    embedding = sparse.student.output_weight()
    assert any(m.sparse for m in sparse.student.modules() if isinstance(m, torch.nn.Embedding) and m.weight is embedding)

    expected, got = _step(dense, inputs, teacher), _step(sparse, inputs, teacher)
    assert expected.keys() == got.keys()
    for key, grad in got.items():
        assert grad.layout == torch.strided, f"{key}: gradient is {grad.layout}, the optimizer needs dense"
        torch.testing.assert_close(grad, expected[key], rtol=1e-5, atol=1e-7, msg=key)
    key = next(k for k, p in sparse.named_parameters() if p is embedding)
    assert got[key].abs().sum() > 0

    # one fused AdamW step takes it (a sparse W.grad would be refused)
    torch.optim.AdamW([p for p in sparse.parameters() if p.requires_grad], lr=1e-3, fused=True).step()


def test_no_dense_embedding_backward_runs():
    student = build_model(load_cfg("tiny_text_student"))
    student.train()
    inputs = _inputs(student)
    ops = {}
    for stage in (3, 0):
        objective = DistillationObjective(copy.deepcopy(student), build_loss("ce"), student.vocab_size, zero_stage=stage)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _step(objective, inputs, None, micro_batches=1)
        ops[stage] = {e.key for e in prof.key_averages()}
    assert "aten::embedding_dense_backward" in ops[3]
    assert "aten::embedding_dense_backward" not in ops[0] and "aten::embedding_sparse_backward" in ops[0]


def test_untied_or_frozen_embeddings_are_left_dense():
    cfg = load_cfg("tiny_text_student")
    cfg["llm"]["config"]["tie_word_embeddings"] = False
    untied = build_model(cfg)
    assert not DistillationObjective(untied, build_loss("ce"), untied.vocab_size).sparse_embedding_grad
    assert not any(m.sparse for m in untied.modules() if isinstance(m, torch.nn.Embedding))

    frozen = build_model(load_cfg("tiny_text_student"))
    frozen.output_weight().requires_grad_(False)
    assert not DistillationObjective(frozen, build_loss("ce"), frozen.vocab_size).sparse_embedding_grad
