"""The trainer as a recipe, driven piece by piece in this process: setup, evaluate, train_step, save,
resume (exact continuation), the eval-only teacher of an SFT run, and the three teacher sources giving
the same evaluation numbers."""

from __future__ import annotations

import math

import pytest
import torch

from taid_vlm.config import load_config
from taid_vlm.losses import CachedTopKTeacher, LogitsTeacher, OnlineTeacher
from taid_vlm.train.evaluate import metric_sums
from taid_vlm.train.trainer import Trainer
from tests.train_helpers import CONFIGS, records


@pytest.fixture(scope="module")
def small_text(synthetic_shards):
    return synthetic_shards(120, val_fraction=0.2, text_only=True)


def config(data, out, *overrides):
    return load_config(CONFIGS / "tiny_text.yaml", [
        f"data.train={data}/train", f"data.val={data}/val", "data.synthetic=null", f"output_dir={out}",
        "train.total_steps=6", "train.eval_batches=2", "train.progress_bar=false", "train.tensorboard=false",
        *overrides])


@pytest.mark.slow
def test_recipe_steps_save_and_resume_in_process(small_text, tmp_path, one_process_group, monkeypatch):
    from taid_vlm.train import trainer as trainer_module
    from taid_vlm.train.data_guard import data_counts

    run = Trainer(config(small_text, tmp_path / "run")).setup().resume()
    assert run.step == 0 and run.train_teacher is run.teacher is not None
    before = run.evaluate()
    assert before["eval_kl"] > 0 and before["eval_tokens"] > 0
    records = [run.train_step() for _ in range(2)]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert records[0]["supervised_tokens"] > 0 and records[0]["skipped_micro_batches"] == 0
    assert run.loss_fn.t > 0.4  # one schedule update per optimizer step (the first only records J)
    run.save()
    assert (tmp_path / "run" / "checkpoints" / "step00000002" / "COMPLETE").is_file()
    state_at_2 = run.loss_fn.schedule_state()
    sums = []  # the step's sums over ranks: the data guard's four counters ride on the one for the token counts
    monkeypatch.setattr(trainer_module, "all_reduce_sum", lambda v, d: sums.append(list(v)) or list(v))
    third = run.train_step()
    assert [len(v) for v in sums if len(v) > 1] == [6] and sums[-1][2:] == data_counts(run.train_loader)
    assert run.data_totals == data_counts(run.train_loader) and run.data_totals[0] >= 12  # 3 steps x 4 samples
    monkeypatch.undo()

    again = Trainer(config(small_text, tmp_path / "run", "train.resume=true")).setup().resume()
    assert again.step == 2 and again.loss_fn.schedule_state() == state_at_2
    resumed = again.train_step()
    # same parameters, optimizer state, data position and t: the same third step
    assert resumed["loss"] == pytest.approx(third["loss"], rel=1e-6)
    assert resumed["supervised_tokens"] == third["supervised_tokens"]
    assert again.loss_fn.t == pytest.approx(run.loss_fn.t, rel=1e-9)


@pytest.mark.slow
def test_resume_applies_the_optimizer_settings_of_the_new_config(small_text, tmp_path, one_process_group):
    """The checkpoint restores AdamW's hyper-parameters and the schedule's base LR as they were saved;
    a resumed run must train with the lr / betas / eps / weight decay its config now says, on the
    schedule's position at the step reached (the schedule's shape comes from the new config too)."""
    from taid_vlm.train.lr_schedule import lr_factor

    first = Trainer(config(small_text, tmp_path / "run")).setup().resume()
    # each record carries the LR its step applied: warmup 2 gives 1e-3 x 1/2, 2/2, then the cosine
    applied = [first.train_step()["lr"] for _ in range(3)]
    assert applied == pytest.approx([5e-4, 1e-3, 1e-3 * lr_factor(2, 6, first.cfg.optim)])
    first.save()

    changed = ["train.resume=true", "optim.lr=2.5e-4", "optim.weight_decay=0.05", "optim.betas=[0.8,0.99]",
               "optim.eps=1e-6", "train.total_steps=10"]
    again = Trainer(config(small_text, tmp_path / "run", *changed)).setup().resume()
    assert again.step == 3
    expected_lr = 2.5e-4 * lr_factor(3, 10, again.cfg.optim)
    assert again.scheduler.base_lrs == [2.5e-4] * len(again.scheduler.base_lrs)
    assert again.scheduler.get_last_lr()[0] == pytest.approx(expected_lr, rel=1e-12)
    for group in again.scheduler.optimizer.param_groups:
        assert group["lr"] == pytest.approx(expected_lr, rel=1e-12)
        assert (group["weight_decay"], tuple(group["betas"]), group["eps"]) == (0.05, (0.8, 0.99), 1e-6)
    assert again.train_step()["lr"] == pytest.approx(expected_lr, rel=1e-12)  # the LR step 4 trained with
    assert again.scheduler.get_last_lr()[0] == pytest.approx(2.5e-4 * lr_factor(4, 10, again.cfg.optim), rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("max_length", [64, 256])
def test_metrics_count_the_samples_used_and_cut_to_max_length(small_text, tmp_path, one_process_group, max_length):
    """Every logged step says how many samples were used and how many of them were cut to
    data.max_length; the end record too. Each step takes 4 sample positions of the global order, so
    used + skipped = 4 x steps: at 64 tokens some samples are too long even after the cut (skipped,
    too_long), others are cut and kept; at 256 none is cut."""
    run = Trainer(config(small_text, tmp_path / "run", f"data.max_length={max_length}", "train.total_steps=3",
                         "train.log_every=1", "train.save_every=0")).setup().resume()
    run.fit()
    logged = records(tmp_path / "run")
    steps = [r for r in logged if "loss" in r]
    end = next(r for r in logged if r.get("event") == "end")
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["samples_used"] + sum(r["skipped_samples"].values()) == 4 * r["step"]
    assert end["samples_used"] == steps[-1]["samples_used"] == run.train_loader.stats["samples"]
    assert end["truncated_samples"] == steps[-1]["truncated_samples"] == run.train_loader.stats.get("truncated", 0)
    if max_length == 64:
        assert 0 < end["truncated_samples"] < end["samples_used"] < 12
        assert set(steps[-1]["skipped_samples"]) == {"too_long"}
    else:
        assert end["truncated_samples"] == 0 and end["samples_used"] == 12


@pytest.mark.slow
@pytest.mark.parametrize("total_steps", [3, 2])
def test_resuming_a_finished_run_evaluates_without_rewriting_its_checkpoint(small_text, tmp_path, one_process_group,
                                                                           total_steps):
    """A requeued job whose run had finished (3 of 3), or one resumed with total_steps lowered below the
    step reached (3 of 2): no step is trained, the held-out metrics are logged again, and the checkpoint
    it was resumed from is left as it was (not written a second time)."""
    Trainer(config(small_text, tmp_path / "run", "train.total_steps=3", "train.save_every=0")).setup().resume().fit()
    ckpt_dir = tmp_path / "run" / "checkpoints" / "step00000003"
    before = {f.name: f.stat().st_mtime_ns for f in ckpt_dir.rglob("*") if f.is_file()}

    again = Trainer(config(small_text, tmp_path / "run", "train.resume=true", f"train.total_steps={total_steps}"))
    result = again.setup().resume().fit()
    assert again.step == 3 and result["eval_kl"] > 0
    assert {f.name: f.stat().st_mtime_ns for f in ckpt_dir.rglob("*") if f.is_file()} == before
    assert sorted(d.name for d in ckpt_dir.parent.iterdir() if d.name.startswith("step")) == ["step00000003"]
    logged = records(tmp_path / "run")
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3]  # nothing trained after the resume
    assert [r["step"] for r in logged if "eval_kl" in r] == [3, 3]


@pytest.mark.slow
def test_resume_takes_the_runs_saved_config_and_logs_what_the_command_changes(small_text, tmp_path, one_process_group,
                                                                             caplog):
    """A run started with overrides (9 steps, lr 5e-4, log every 3; the file says 20, 1e-3, 1) and stopped
    after step 2: `--resume` alone continues with the run's settings, not the file's, to step 9; an
    override on the resume command wins and is logged."""
    from taid_vlm.train.resume_config import run_config

    out = tmp_path / "run"
    stopped = Trainer(config(small_text, out, "train.total_steps=9", "optim.lr=5e-4", "train.log_every=3"))
    stopped.setup().resume()
    stopped.train_step(), stopped.train_step()
    stopped.save()  # what a stop request does after step 2
    stopped.metrics.close()

    resume = [f"data.train={small_text}/train", f"output_dir={out}", "train.resume=true"]
    with caplog.at_level("INFO", "taid_vlm.train"):
        longer = run_config(CONFIGS / "tiny_text.yaml", [*resume, "train.total_steps=12"])
        assert "changed on this command: train.total_steps: 9 -> 12" in caplog.text
        cfg = run_config(CONFIGS / "tiny_text.yaml", resume)
        assert caplog.text.rstrip().endswith(f"resuming with the run's saved config ({out / 'config.yaml'}); "
                                             "nothing changed on this command")
    assert (longer.train.total_steps, longer.optim.lr) == (12, 5e-4)
    assert (cfg.train.total_steps, cfg.optim.lr, cfg.train.log_every, cfg.train.resume) == (9, 5e-4, 3, True)
    again = Trainer(cfg).setup().resume()
    assert again.step == 2
    again.fit()
    assert again.step == 9 and [r["step"] for r in records(out) if "loss" in r] == [3, 6, 9]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000009"


@pytest.mark.slow
def test_sft_run_with_a_teacher_evaluates_against_it_but_trains_alone(small_text, tmp_path, one_process_group):
    sft = ["loss.name=ce", "loss.params={}"]
    with_teacher = Trainer(config(small_text, tmp_path / "a", *sft)).setup().resume()
    assert with_teacher.teacher is not None and with_teacher.train_teacher is None
    ev = with_teacher.evaluate()
    assert ev["eval_kl"] > 0 and 0.0 <= ev["eval_top1_agreement"] <= 1.0 and "eval_teacher_ce" in ev

    alone = Trainer(config(small_text, tmp_path / "b", *sft, "teacher.model=null")).setup().resume()
    assert alone.teacher is None
    ev_alone = alone.evaluate()
    assert "eval_kl" not in ev_alone
    # the eval-only teacher changes nothing of the student: same initialisation, same first steps
    assert ev_alone["eval_student_ce"] == ev["eval_student_ce"]
    assert [alone.train_step()["loss"] for _ in range(2)] == [with_teacher.train_step()["loss"] for _ in range(2)]
    assert "teacher" not in next(iter(with_teacher.train_loader))  # train batches: no teacher rendering


def test_metric_sums_agree_for_every_teacher_source():
    g = torch.Generator().manual_seed(3)
    K, H, V = 37, 8, 29
    h_s, w_s = torch.randn(K, H, generator=g), torch.randn(V, H, generator=g)
    h_t, w_t = torch.randn(K, H, generator=g), torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (K,), generator=g)
    logits = h_t @ w_t.T
    logprobs, ids = torch.log_softmax(logits, -1).sort(-1, descending=True)
    full_topk = CachedTopKTeacher(ids, logprobs, torch.full((K,), float("-inf")))  # k = V: exact
    online = metric_sums(h_s, w_s, OnlineTeacher(h_t, w_t), targets, chunk=8)
    for other in (LogitsTeacher(logits), full_topk):
        got = metric_sums(h_s, w_s, other, targets, chunk=8)
        assert got == pytest.approx(online, rel=1e-5, abs=1e-6)
    assert online["kl"] > 0 and 0 <= online["top1_agreement"] <= K
    alone = metric_sums(h_s, w_s, None, targets, chunk=8)
    assert alone["student_ce"] == online["student_ce"] and alone["kl"] == 0.0
