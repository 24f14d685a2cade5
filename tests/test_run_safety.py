"""Never lose work, always say what is wrong: signals, the run folder, checks before building, the
divergence guard, with the real `taid-vlm train` on the tiny text recipe."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.train_helpers import SUBPROCESS_TIMEOUT_S as TIMEOUT, env, records, run, signal_at_step, step_losses, train_cmd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def data(root: Path) -> list[str]:
    return [f"data.train={root}/train", f"data.val={root}/val", "data.synthetic=null", "train.eval_batches=1"]


def fails(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0, proc.stderr[-3000:]
    return proc


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


# ---- signals ----------------------------------------------------------------------------------------

STEPS = 40


def test_sigterm_at_a_random_step_then_resume_equals_the_uninterrupted_run(shapes_text, tmp_path):
    common = [*data(shapes_text), f"train.total_steps={STEPS}"]
    full = tmp_path / "full"
    run(train_cmd("tiny_text.yaml", full, *common), timeout=TIMEOUT)

    at = random.Random().randint(2, STEPS // 2)
    out = tmp_path / "stopped"
    proc = signal_at_step(train_cmd("tiny_text.yaml", out, *common), out, at, signal.SIGTERM)
    assert proc.returncode == 143, (at, proc.stderr[-3000:])  # non-zero: a scheduler requeues the job
    assert "Traceback" not in proc.stderr
    stopped = [r for r in records(out) if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == signal.SIGTERM
    step = stopped[0]["step"]
    assert at <= step < STEPS, (at, step)
    assert f"stopped by SIGTERM after step {step}; checkpoint" in proc.stderr and "continue with the same command plus --resume" in proc.stderr
    tag = f"step{step:08d}"
    assert (out / "checkpoints" / "latest").read_text().strip() == tag
    assert (out / "checkpoints" / tag / "COMPLETE").is_file()

    run(train_cmd("tiny_text.yaml", out, *common, "--resume"), timeout=TIMEOUT)
    want, got = step_losses(full), step_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert got[s] == pytest.approx(want[s], rel=0, abs=1e-6), (at, step, s)


def test_sigint_finishes_the_step_saves_and_exits_with_a_message(shapes_text, tmp_path):
    common = [*data(shapes_text), f"train.total_steps={STEPS}"]
    out = tmp_path / "interrupted"
    proc = signal_at_step(train_cmd("tiny_text.yaml", out, *common), out, 3, signal.SIGINT)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    assert "SIGINT received: finishing the current optimizer step" in proc.stderr
    step = [r for r in records(out) if r.get("event") == "stopped"][0]["step"]
    assert f"taid-vlm: stopped by SIGINT after step {step}; checkpoint" in proc.stderr
    assert (out / "checkpoints" / f"step{step:08d}" / "COMPLETE").is_file()
    # Without --resume the folder is refused (it holds this run); with it the run ends normally.
    assert "--resume" in error_line(fails(train_cmd("tiny_text.yaml", out, *common)))
    run(train_cmd("tiny_text.yaml", out, *common, "--resume"), timeout=TIMEOUT)
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:08d}"


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_process_group_with_loader_workers_saves_and_resumes_exactly(shapes_text, tmp_path, signum, code):
    """DataLoader workers get the group's signal too; they must not die of it mid-step (the main process
    used to raise "DataLoader worker ... is killed by signal" and lose the step and the checkpoint)."""
    steps = 12
    common = [*data(shapes_text), f"train.total_steps={steps}", "data.num_workers=2"]
    full = tmp_path / "full"
    run(train_cmd("tiny_text.yaml", full, *common), timeout=TIMEOUT)
    out = tmp_path / "stopped"
    proc = signal_at_step(train_cmd("tiny_text.yaml", out, *common), out, 3, signum, group=True)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "killed by signal" not in proc.stderr, proc.stderr[-3000:]
    step = [r for r in records(out) if r.get("event") == "stopped"][0]["step"]
    assert (out / "checkpoints" / f"step{step:08d}" / "COMPLETE").is_file()
    run(train_cmd("tiny_text.yaml", out, *common, "--resume"), timeout=TIMEOUT)
    want, got = step_losses(full), step_losses(out)
    assert sorted(got) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert got[s] == pytest.approx(want[s], rel=0, abs=1e-6), (step, s)


SECOND_SIGNAL = textwrap.dedent(
    """
    import os, signal, sys, time
    from taid_vlm.train.signals import GracefulStop

    signum = int(sys.argv[1])
    with GracefulStop() as stop:
        os.kill(os.getpid(), signum)
        time.sleep(0.2)
        assert stop.requested and stop.signum == signum
        os.kill(os.getpid(), signum)   # within the window: a launcher forwarding the same signal
        time.sleep(0.2)
        print("first signal: still running", flush=True)
        time.sleep(2.0)
        os.kill(os.getpid(), signum)
        time.sleep(5)
        print("not reached", flush=True)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_exits_at_once(signum):
    proc = subprocess.run([sys.executable, "-c", SECOND_SIGNAL, str(int(signum))], env=env(), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.stdout.splitlines() == ["first signal: still running"], proc.stderr
    assert proc.returncode == -signum  # ended by the signal itself, no handler, no traceback
    assert "Traceback" not in proc.stderr


# ---- run folder -------------------------------------------------------------------------------------

def test_run_folder_belongs_to_one_run(shapes_text, tmp_path):
    out = tmp_path / "run"
    common = [*data(shapes_text), "train.total_steps=3", "train.save_every=1", "train.keep_last=2"]
    run(train_cmd("tiny_text.yaml", out, *common), timeout=TIMEOUT)
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step00000002", "step00000003"]
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / ".tmp-step00000099").mkdir()  # debris of a killed save

    line = error_line(fails(train_cmd("tiny_text.yaml", out, *data(shapes_text), "train.total_steps=2")))
    assert line == (f"error: the output folder already holds another run (checkpoints step00000002..step00000003, "
                    f"metrics.jsonl); continue it with --resume, replace it with --overwrite, or choose another "
                    f"--output-dir ({out})")
    assert "--overwrite deletes the run" in error_line(fails(train_cmd("tiny_text.yaml", out, *common, "--resume",
                                                                         "--overwrite")))

    # --overwrite: a new run of 2 steps; only the run's own files were replaced.
    run(train_cmd("tiny_text.yaml", out, *data(shapes_text), "train.total_steps=2", "--overwrite"), timeout=TIMEOUT)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step00000002"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000002"
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert sorted(step_losses(out)) == [1, 2] and not [r for r in records(out) if r.get("event") == "resume"]


def test_prune_never_deletes_the_newest_checkpoint(tmp_path):
    from taid_vlm.train.checkpoint import prune

    for step in (100, 200, 20):
        (tmp_path / f"step{step:08d}").mkdir()
    prune(tmp_path, keep=tmp_path / "step00000020", keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step*")) == ["step00000020", "step00000200"]
    prune(tmp_path, keep=tmp_path / "step00000020", keep_last=1)
    assert [p.name for p in tmp_path.glob("step*")] == ["step00000020"]


# ---- checks before anything heavy is built ----------------------------------------------------------

def test_bad_inputs_are_one_line_before_anything_is_built(shapes_text, tmp_path):
    out = tmp_path / "bad"
    line = error_line(fails(train_cmd("tiny_text.yaml", out, *data(shapes_text),
                                      "student.model.llm.config.hiden_size=32")))
    assert line.startswith("error: unknown key for Qwen2Config; did you mean hidden_size? known: ")
    assert line.endswith("(student.model.llm.config.hiden_size)") and "num_hidden_layers" in line
    line = error_line(fails(train_cmd("tiny_text.yaml", out, *data(shapes_text), "data.val=missing/val")))
    assert line == f"error: shard {str(Path.cwd() / 'missing/val')!r} does not exist (data.val)"
    line = error_line(fails(train_cmd("tiny_text.yaml", out, *data(shapes_text), "--resume")))
    assert line == f"error: --resume: no complete checkpoint to continue from; start a new run without --resume ({out / 'checkpoints'})"
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_overrides_reach_into_model_files_and_resume_names_what_changed(shapes_text, tmp_path):
    out = tmp_path / "run"
    small = [*data(shapes_text), "train.total_steps=2", "student.model.llm.config.hidden_size=32"]
    run(train_cmd("tiny_text.yaml", out, *small), timeout=TIMEOUT)
    state = torch.load(out / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt", weights_only=False)
    embed = [v for k, v in state["module"].items() if k.endswith("embed_tokens.weight")]
    assert len(embed) == 1 and embed[0].shape[1] == 32
    # The resume takes the run's saved config (hidden_size 32 stays without being repeated); what the
    # command changes is checked against the checkpoint: a model override or another loss is refused.
    line = error_line(fails(train_cmd("tiny_text.yaml", out, *data(shapes_text), "train.total_steps=4", "--resume",
                                      "loss.name=fkl", "student.model.llm.config.num_hidden_layers=1")))
    assert line.startswith("error: cannot resume: the config changed since step00000002 was written (")
    assert "student.model.llm.config.num_hidden_layers: 2 -> 1" in line and "loss.name: 'taid' -> 'fkl'" in line
    assert "hidden_size" not in line and "start fresh with --overwrite or a new --output-dir" in line


def test_readme_loss_override_drops_the_taid_parameters_with_a_warning(shapes_text, tmp_path):
    out = tmp_path / "fkl"
    proc = run(train_cmd("tiny_text.yaml", out, *data(shapes_text), "train.total_steps=2", "loss.name=fkl",
                         "optim.lr=3e-4"), timeout=TIMEOUT)
    assert "loss.params: alpha, beta, t_end, t_start from the config file do not apply to loss 'fkl'" in proc.stderr
    assert sorted(step_losses(out)) == [1, 2]


# ---- divergence guard -------------------------------------------------------------------------------

def test_collapse_with_a_huge_learning_rate_is_detected(shapes_text, tmp_path):
    out = tmp_path / "lr1e6"
    proc = fails(train_cmd("tiny_text.yaml", out, *data(shapes_text), "optim.lr=1e6"))
    assert proc.returncode == 1
    line = error_line(proc)
    assert "the run collapsed: the gradient norm has been exactly 0 for 3 steps in a row" in line
    steps = step_losses(out)
    assert max(steps) < 10  # stopped early instead of "succeeding" after 20 steps
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step*"))


def test_blown_up_parameters_are_never_checkpointed(shapes_text, tmp_path):
    out = tmp_path / "lr1e30"
    proc = fails(train_cmd("tiny_text.yaml", out, *data(shapes_text), "optim.lr=1e30", "train.save_every=1"))
    assert proc.returncode == 1
    line = error_line(proc)
    assert "the run diverged: the parameter norm grew from" in line and "no checkpoint written" in line
    # Nothing with blown-up weights on disk, and no half-written checkpoint either.
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())


def test_divergence_guard_rules():
    """Unit: a loss jump, non-finite parameters, and the reference moving to the last saved norm."""
    from taid_vlm.train.guard import DivergenceError, DivergenceGuard

    guard = DivergenceGuard(loss_jump_factor=100, max_zero_grad_steps=3, param_growth_factor=100)
    for step, loss in enumerate([2.0, 1.9, 1.8, 1.7, 1.6, 1.5], start=1):
        guard.after_step(step, loss, 0.5)
    with pytest.raises(DivergenceError, match="the loss jumped to 500 at step 7"):
        guard.after_step(7, 500.0, 0.5)
    guard.set_reference(10.0)
    with pytest.raises(DivergenceError, match="are not finite"):
        guard.check_before_save(8, float("nan"))
    guard.check_before_save(8, 50.0)
    assert guard.reference_norm == 50.0


def test_dropped_micro_batches_are_counted_in_metrics(shapes_text, tmp_path):
    """A teacher whose embedding row of one token is NaN: every micro-batch with a sample holding that token
    has a NaN loss and is dropped; the running count is in metrics.jsonl and matches the warnings."""
    from collections import Counter

    from taid_vlm.config import load_config
    from taid_vlm.data import build_loader
    from taid_vlm.models import build_model
    from tests.train_helpers import CONFIGS

    # Untied embeddings: a NaN input row must not also be a NaN output row (that would poison every batch).
    cfg = load_config(CONFIGS / "tiny_text.yaml", ["teacher.model.llm.config.tie_word_embeddings=false"])
    teacher = build_model(cfg.teacher.model, role="teacher")
    spec = teacher.input_spec
    loader = build_loader(str(shapes_text / "train"), spec, spec, mode="eval", batch_size=1, max_length=256,
                          num_workers=0, text_only=True)
    in_samples, n = Counter(), 0
    for batch in loader:
        n += 1
        in_samples.update(set(batch["teacher"]["input_ids"][0].tolist()))
    # A token in about 1 sample of 12: some micro-batches of 4 hold it, most do not.
    token = min(in_samples, key=lambda t: abs(in_samples[t] / n - 1 / 12))
    with torch.no_grad():
        teacher.llm.get_input_embeddings().weight[token].fill_(float("nan"))
    teacher.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "run"
    proc = run(train_cmd("tiny_text.yaml", out, *data(shapes_text), f"teacher.model={{saved: {tmp_path / 'teacher'}}}",
                         "train.total_steps=12", "train.max_nonfinite_in_a_row=50"), timeout=TIMEOUT)
    warned = proc.stderr.count("micro-batch skipped")
    steps = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13)) and all(r["loss"] is not None for r in steps)
    assert warned > 0 and steps[-1]["dropped_micro_batches"] == warned
    assert sum(r["skipped_micro_batches"] for r in steps) == warned


def _wait_for_group(pgid: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    pytest.fail("processes of the launch still running")


def test_sigterm_to_the_deepspeed_launcher_group_saves_on_every_rank(shapes_text, tmp_path):
    """What a scheduler does: SIGTERM to every process of the job (launcher and ranks). DeepSpeed's launcher
    forwards it once more to each rank; both ranks still stop after the same step and save together."""
    common = [*data(shapes_text), f"train.total_steps={STEPS}", "train.micro_batch_size=2"]
    out = tmp_path / "two"
    log = tmp_path / "two.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(train_cmd("tiny_text.yaml", out, *common, nproc=2), env=env(), stdout=stderr,
                                stderr=stderr, start_new_session=True)
        try:
            while max(step_losses(out), default=0) < 3 if (out / "metrics.jsonl").exists() else True:
                if proc.poll() is not None:
                    pytest.fail(f"the run ended early: {log.read_text()[-3000:]}")
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=TIMEOUT)
            _wait_for_group(proc.pid)  # the `deepspeed` runner dies at once; launcher and ranks finish the save
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text()
    stopped = [r for r in records(out) if r.get("event") == "stopped"]
    assert len(stopped) == 1, text[-3000:]
    tag = f"step{stopped[0]['step']:08d}"
    final = out / "checkpoints" / tag
    assert (final / "COMPLETE").is_file() and (final / "rank_00000.pt").is_file() and (final / "rank_00001.pt").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == tag
    assert text.count(f"stopped by SIGTERM after step {stopped[0]['step']}") == 2, text[-3000:]  # both ranks
