"""train.eval_generation on a 2-process ZeRO-3 launch (the student's parameters sharded, gathered for
generation on every rank) scores the same held-out answers as one process: the whole val set is scored,
so the sample set does not depend on the layout, and the sums over ranks give the same numbers.

Cost: one single-process and one two-process run of 20 tiny steps (~1 min on 2 cores)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from tests.train_helpers import evals, run, train_cmd

pytestmark = pytest.mark.slow

COMMON = ["train.total_steps=20", "train.micro_batch_size=2", "data.num_workers=0", "data.synthetic=null",
          "loss.name=ce", "optim.lr=1.0e-2", "optim.warmup_steps=0", "train.eval_batches=0",
          "train.eval_generation=1000", "train.eval_max_new_tokens=4",
          "deepspeed.extra={zero_optimization: {stage3_param_persistence_threshold: 0}}"]


@pytest.fixture(scope="module")
def chat_data(synthetic_shards) -> Path:
    return synthetic_shards(48, val_fraction=0.25, text_only=True)


def _final_eval(root: Path, name: str, data: Path, nproc: int, *extra: str) -> dict:
    out = root / name
    run(train_cmd("tiny_text.yaml", out, f"data.train={data}/train", f"data.val={data}/val", *COMMON,
                  f"train.grad_accum={2 // nproc}", *extra, nproc=nproc))
    return evals(out)[20]


def test_zero3_two_ranks_score_what_one_process_scores(chat_data, tmp_path):
    one = _final_eval(tmp_path, "one", chat_data, 1)
    two = _final_eval(tmp_path, "two_zero3", chat_data, 2, "deepspeed.zero_stage=3")
    held_out = sum(1 for tar in (chat_data / "val").glob("*.tar") for m in tarfile.open(tar) if m.name.endswith(".json"))
    assert one["eval_generated"] == two["eval_generated"] == held_out > 0  # every held-out conversation, once
    assert one["eval_rougeL"] > 0  # 20 CE steps at lr 1e-2: the student answers some questions ("one", "blue")
    for key in ("eval_rougeL", "eval_exact_match", "eval_student_ce"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
