"""End-to-end runs of the real trainer (CLI and the stock deepspeed launcher) on the tiny recipes."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.train_helpers import (CONFIGS, SUBPROCESS_TIMEOUT_S, env, evals, records, run, signal_at_step, step_losses,
                                 train_cmd)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shapes(synthetic_shards) -> Path:
    return synthetic_shards(240, val_fraction=0.15)


def data_overrides(root: Path) -> list[str]:
    return [f"data.train={root}/train", f"data.val={root}/val", "data.synthetic=null"]


def test_tiny_vlm_run_loss_falls_and_t_rises(shapes, tmp_path):
    out = tmp_path / "run"
    run(train_cmd("tiny_vlm.yaml", out, *data_overrides(shapes), "train.eval_at_start=true"))
    logged = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 21))
    for key in ("loss", "t", "lr", "grad_norm", "tokens_per_s"):
        assert all(r[key] is not None for r in logged), key
    losses = [r["loss"] for r in logged]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    ts = [r["t"] for r in logged]
    assert ts[0] == pytest.approx(0.4) and ts[-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(ts, ts[1:]))
    ev = evals(out)
    assert ev[20]["eval_kl"] < 0.5 * ev[0]["eval_kl"]
    assert 0.0 <= ev[20]["eval_top1_agreement"] <= 1.0 and ev[20]["eval_tokens"] > 50
    assert (out / "checkpoints" / "step00000020" / "COMPLETE").is_file()


def _val_ce_of_exported_text_model(export_dir: Path, val_dir: Path, batch_size: int, max_length: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from taid_vlm.data import build_loader
    from taid_vlm.spec import InputSpec

    model = AutoModelForCausalLM.from_pretrained(str(export_dir)).eval()
    spec = InputSpec(tokenizer=AutoTokenizer.from_pretrained(str(export_dir)))
    # The student's own rendering: the trainer renders teacher and student, and supervised tokens
    # without a partner are dropped; with one shared tokenizer there are none.
    loader = build_loader(str(val_dir), spec, spec, mode="eval", batch_size=batch_size, max_length=max_length,
                          num_workers=0, text_only=True)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            s = batch["student"]
            logits = model(input_ids=s["input_ids"], attention_mask=s["attention_mask"]).logits.float()
            flat = logits.reshape(-1, logits.shape[-1])[s["loss_positions"]]
            total += float(torch.nn.functional.cross_entropy(flat, s["loss_targets"], reduction="sum"))
            count += s["loss_targets"].numel()
    return total / count


def test_text_only_run_and_export_loads_in_transformers(shapes_text, tmp_path):
    out = tmp_path / "text"
    run(train_cmd("tiny_text.yaml", out, *data_overrides(shapes_text), "train.total_steps=8", "train.eval_batches=0"))
    assert [r["step"] for r in records(out) if "loss" in r] == list(range(1, 9))
    export = tmp_path / "export"
    run([str(Path(os.sys.executable).parent / "taid-vlm"), "export", str(out), str(export)])
    assert (export / "config.json").is_file() and (export / "tokenizer.json").is_file()
    ce = _val_ce_of_exported_text_model(export, shapes_text / "val", batch_size=4, max_length=256)
    assert ce == pytest.approx(evals(out)[8]["eval_student_ce"], rel=1e-5)


LAUNCH = ["train.total_steps=6", "train.micro_batch_size=2", "deepspeed.extra={zero_optimization: {stage3_param_persistence_threshold: 0}}"]


@pytest.fixture(scope="module")
def zero3_run(shapes, tmp_path_factory) -> Path:
    """2 processes, ZeRO-3 student and teacher, the whole val split evaluated at the end: the launcher test's
    ZeRO-3 run and the export test's checkpoint (one run serving both)."""
    out = tmp_path_factory.mktemp("two_process") / "zero3"
    run(train_cmd("tiny_vlm.yaml", out, *data_overrides(shapes), *LAUNCH, "deepspeed.zero_stage=3",
                  "teacher.placement=zero3", "train.eval_batches=0", nproc=2))
    return out


def test_two_process_launcher_zero2_zero3_and_sharded_teacher_match_and_share_t(shapes, zero3_run, tmp_path):
    runs = {3: zero3_run}
    # ZeRO-0 reference; ZeRO-2 student; ZeRO-3 student with the teacher sharded by ZeRO-3 as well.
    for stage in (0, 2):
        out = tmp_path / f"zero{stage}"
        run(train_cmd("tiny_vlm.yaml", out, *data_overrides(shapes), *LAUNCH, f"deepspeed.zero_stage={stage}",
                      "teacher.placement=replicated", "train.eval_batches=2", nproc=2))
        runs[stage] = out
    reference = step_losses(runs[0])
    assert sorted(reference) == list(range(1, 7))
    for stage in (2, 3):
        got = step_losses(runs[stage])
        for step, value in reference.items():
            assert got[step] == pytest.approx(value, rel=1e-4, abs=1e-7), (stage, step)
        final = runs[stage] / "checkpoints" / "step00000006"
        t0 = torch.load(final / "rank_00000.pt", weights_only=False)["schedule"]
        t1 = torch.load(final / "rank_00001.pt", weights_only=False)["schedule"]
        assert t0 == t1 and t0["t"] > 0.4
    # Against one process (micro-batch 4: the same 4 samples per step, split differently over ranks and
    # shuffled per rank, so the trajectories agree statistically, not step by step); both evaluate all of val.
    single = tmp_path / "single"
    run(train_cmd("tiny_vlm.yaml", single, *data_overrides(shapes), "train.total_steps=6", "train.eval_batches=0"))
    one = step_losses(single)
    assert sum(one.values()) / 6 == pytest.approx(sum(reference.values()) / 6, rel=0.25)
    assert evals(single)[6]["eval_kl"] == pytest.approx(evals(runs[3])[6]["eval_kl"], rel=0.25)


def test_zero3_export_reproduces_the_student_eval(shapes, zero3_run, tmp_path):
    """2-process ZeRO-3 checkpoint -> consolidated export -> the same held-out student CE."""
    from taid_vlm.data import build_loader
    from taid_vlm.models import load_model

    out = zero3_run
    export = tmp_path / "export"
    run([str(Path(os.sys.executable).parent / "taid-vlm"), "export", str(out), str(export)])
    student = load_model(export).eval()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(export / "llm")) is not None
    from taid_vlm.models import build_model
    from taid_vlm.config import load_config

    teacher_spec = build_model(load_config(CONFIGS / "tiny_vlm.yaml").teacher.model, role="teacher").input_spec
    loader = build_loader(str(shapes / "val"), student.input_spec, teacher_spec, mode="eval", batch_size=2,
                          max_length=256, num_workers=0)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            s = batch["student"]
            logits = student(s["input_ids"], s["attention_mask"], s["pixel_values"]).float()
            flat = logits.reshape(-1, logits.shape[-1])[s["loss_positions"]]
            total += float(torch.nn.functional.cross_entropy(flat[:, : len(student.tokenizer)], s["loss_targets"], reduction="sum"))
            count += s["loss_targets"].numel()
    assert total / count == pytest.approx(evals(out)[6]["eval_student_ce"], rel=1e-5)


def test_resume_after_sigkill_repeats_the_uninterrupted_losses(shapes, tmp_path):
    common = [*data_overrides(shapes), "train.save_every=5", "train.eval_batches=1"]
    full = tmp_path / "full"
    run(train_cmd("tiny_vlm.yaml", full, *common))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd("tiny_vlm.yaml", killed, *common), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + SUBPROCESS_TIMEOUT_S
    try:
        while time.time() < deadline:
            if (killed / "metrics.jsonl").exists() and 12 in step_losses(killed):
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before step 12")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = max(step_losses(killed))
    assert 12 <= killed_at < 20
    run(train_cmd("tiny_vlm.yaml", killed, *common, "train.resume=true"))
    resumed_from = [r for r in records(killed) if r.get("event") == "resume"][-1]["step"]
    assert resumed_from in (10, 15) and resumed_from <= killed_at
    want, got = step_losses(full), step_losses(killed)
    for step in range(11, 21):
        assert got[step] == pytest.approx(want[step], rel=0, abs=1e-6), step
    assert sorted(got) == list(range(1, 21)) and not math.isnan(got[20])


def test_nonfinite_losses_skip_steps_then_stop_with_a_clear_error(shapes_text, tmp_path):
    """A corrupt (NaN) teacher: every step is skipped without touching the student, then the run stops."""
    from taid_vlm.config import load_config
    from taid_vlm.models import build_model

    teacher = build_model(load_config(CONFIGS / "tiny_text.yaml").teacher.model, role="teacher")
    with torch.no_grad():
        teacher.output_weight().fill_(float("nan"))
    teacher.save_pretrained(tmp_path / "nan_teacher")
    out = tmp_path / "run"
    cmd = train_cmd("tiny_text.yaml", out, *data_overrides(shapes_text), f"teacher.model={{saved: {tmp_path / 'nan_teacher'}}}",
                    "train.max_nonfinite_in_a_row=3")
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode != 0
    assert "micro-batch skipped (1 in a row)" in proc.stderr and "(2 in a row)" in proc.stderr
    assert "3 micro-batches in a row had a non-finite loss (at step 1)" in proc.stderr
    assert "train.max_nonfinite_in_a_row" in proc.stderr
    assert not [r for r in records(out) if "loss" in r]  # no step was taken


STEP_LINE = re.compile(r"INFO taid_vlm\.progress: step (\d+)/(\d+) loss \d+\.\d{4} t [01]\.\d{3} tokens/s \d+(?: ETA (\S+))?$")


def test_a_stopped_run_resumes_to_its_own_step_count_and_its_log_reads_line_by_line(shapes_text, tmp_path):
    """Started with --max-steps 30 (the file says 20) under ZeRO-3, stdout and stderr to a file, stopped by
    SIGTERM: the file holds one readable line per logged step (no bar, no per-command notices), and a
    plain `--resume` trains on to step 30 with the run's saved settings."""
    out = tmp_path / "run"
    common = [*data_overrides(shapes_text), "train.eval_batches=1", "deepspeed.zero_stage=3",
              "deepspeed.extra={zero_optimization: {stage3_param_persistence_threshold: 0}}"]
    first = train_cmd("tiny_text.yaml", out, *common, "train.progress_bar=true", "train.log_every=2", "--max-steps", "30")
    stopped = signal_at_step(first, out, 4, signal.SIGTERM)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    step = [r for r in records(out) if r.get("event") == "stopped"][0]["step"]
    assert 4 <= step < 20, step
    with open(out.parent / f"{out.name}.log", newline="") as raw:  # as written: a bar's carriage returns kept
        lines = raw.read().split("\n")
    assert not [line for line in lines if "\r" in line] and max(map(len, lines)) < 400, max(lines, key=len)[:300]
    steps = [STEP_LINE.search(line) for line in lines if "taid_vlm.progress: step " in line]
    assert all(steps) and [int(m[1]) for m in steps] == list(range(2, step + 1, 2))
    assert {m[2] for m in steps} == {"30"} and all(m[3] for m in steps)  # an ETA on every line before the end
    for notice in ("Setting accelerator to CPU", "FutureWarning", "skipped 0 samples", "Traceback"):
        assert notice not in stopped.stderr, notice

    # train_cmd's train.progress_bar=false is the one setting this command changes (and says so)
    resumed = run(train_cmd("tiny_text.yaml", out, *data_overrides(shapes_text), "--resume"))
    assert (f"resuming with the run's saved config ({out / 'config.yaml'}); changed on this command: "
            "train.progress_bar: True -> False\n") in resumed.stderr
    assert sorted(step_losses(out)) == list(range(2, 31, 2))  # the saved log_every, to the saved 30 steps
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000030"
    last = [STEP_LINE.search(line) for line in resumed.stderr.splitlines() if "progress: step 30/" in line]
    assert len(last) == 1 and last[0][3] is None
