"""Sampling does not depend on the layout: 1 process x grad_accum 2 and 2 processes x 1 (ZeRO-0, and
ZeRO-3 with the student's parameters gathered for generation) generate the same completions, fill the
same replay buffer and train to the same losses; seq_kd with a ZeRO-3 sharded teacher likewise.

Cost: 3 single-process and 3 two-process runs of 3 steps, ~4 min on 2 cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_world_size_invariance import _steps
from tests.train_helpers import run, train_cmd

pytestmark = pytest.mark.slow

COMMON = ["train.total_steps=3", "train.micro_batch_size=2", "data.num_workers=0", "data.val=null",
          "data.synthetic=null", "sampling.do_sample=true", "sampling.max_new_tokens=8", "sampling.capacity=6",
          "deepspeed.extra={zero_optimization: {stage3_param_persistence_threshold: 0}}"]
MIXED = ["sampling.mode=mixed"]
SEQ_KD = ["sampling.mode=on_policy", "sampling.seq_kd=true", "sampling.lmbda=0.5"]


@pytest.fixture(scope="module")
def text_data(synthetic_shards) -> Path:
    return synthetic_shards(60, val_fraction=0.1, text_only=True) / "train"


def _train(root: Path, name: str, data: Path, nproc: int, *extra: str) -> Path:
    out = root / name
    run(train_cmd("tiny_text.yaml", out, f"data.train={data}", *COMMON, f"train.grad_accum={2 // nproc}", *extra,
                  nproc=nproc))
    return out


def _buffer(out: Path) -> list:
    folder = out / "checkpoints" / "step00000003"
    states = sorted(folder.glob("*mp_rank_00_model_states.pt"))[0]
    return torch.load(states, weights_only=False, map_location="cpu")["sampling"]["buffer"]["entries"]


def _assert_same_losses(got: Path, want: Path) -> None:
    a, b = _steps(got), _steps(want)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert a[step]["supervised_tokens"] == b[step]["supervised_tokens"], (got.name, step)
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5, abs=1e-6), (got.name, step)


def test_layouts_and_zero3_generate_and_train_the_same(text_data, tmp_path):
    off = _train(tmp_path, "off_1x2", text_data, 1)
    one = _train(tmp_path, "mixed_1x2", text_data, 1, *MIXED)
    two = _train(tmp_path, "mixed_2x1", text_data, 2, *MIXED)
    zero3 = _train(tmp_path, "mixed_2x1_zero3", text_data, 2, *MIXED, "deepspeed.zero_stage=3")
    buffer = _buffer(one)
    assert 0 < len(buffer) <= 6 and all(1 <= len(e["completion"]) <= 8 for e in buffer)
    assert _buffer(two) == buffer and _buffer(zero3) == buffer  # the same completions, in the same order
    _assert_same_losses(two, one)
    _assert_same_losses(zero3, one)
    assert [r["supervised_tokens"] for r in _steps(one).values()] != [r["supervised_tokens"] for r in _steps(off).values()]

    kd_one = _train(tmp_path, "seq_kd_1x2", text_data, 1, *SEQ_KD)
    kd_zero3 = _train(tmp_path, "seq_kd_2x1_zero3", text_data, 2, *SEQ_KD, "deepspeed.zero_stage=3",
                      "teacher.placement=zero3")
    _assert_same_losses(kd_zero3, kd_one)
    # every micro-batch is generated (student or teacher): at most 4 rows x 8 new tokens per step
    assert all(r["supervised_tokens"] <= 32 for r in _steps(kd_one).values())
