"""The distillation recipe: teacher forward (no grad) -> student forward -> chunked loss -> DeepSpeed step.

    trainer = Trainer(cfg)
    trainer.setup()      # process group, run folder, models, loss, DeepSpeed engine, teacher, data
    trainer.resume()     # from the latest complete checkpoint when train.resume asks; opens the metrics log
    trainer.fit()        # the loop below; returns the last logged metrics

`fit` is: optional eval at step 0; then per optimizer step `train_step` (grad_accum micro-batches per
rank, skipping non-finite ones on every rank alike; the loss of the step is the mean over ALL its
supervised tokens, every micro-batch and every rank (objective.py), and drives ONE TAID schedule
update, so every rank holds the same t and the result does not depend on the world size), the
divergence guard, `log_step`, periodic `evaluate` and `save`, and a stop request (SIGTERM / SIGINT:
save, then stop, signals.py); at the end a last evaluation and checkpoint. Each method runs on its
own in a test process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from taid_vlm.config import ConfigError, RunConfig
from taid_vlm.errors import UserError

from . import checkpoint as ckpt
from . import preflight
from .components import (apply_optim_config, build_loaders, build_loss_fn, build_models, build_optimizer,  # noqa: F401
                         build_role_model, open_teacher_cache, place_teacher)
from .data_guard import check_training_data, data_counts
from .device import to_device
from .ds_config import student_ds_config
from .elastic import load_engine_checkpoint
from .evaluate import evaluate
from .generation_metric import build_generation_scorer
from .guard import DivergenceError, DivergenceGuard, parameter_norm
from .launch_env import all_reduce_sum, configure_logging, init_distributed
from .metrics_log import MetricsLog
from .objective import DistillationObjective, step_denominator, step_loss
from .run_summary import summary_lines
from .sampling import build_step_sampler
from .signals import GracefulStop, TrainingStopped
from .single_rank import backward_reduction
from .synthetic import ensure_synthetic_data
from .teacher import teacher_for_batch
from .trackers import open_trackers

log = logging.getLogger("taid_vlm.train")


class NonFiniteLossError(DivergenceError):
    pass


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.step = 0
        self.last: dict[str, Any] = {}  # the last logged step record, updated by each evaluation
        self.metrics: Optional[MetricsLog] = None  # opened by resume()
        self._nonfinite_in_a_row = 0
        self.dropped_total = 0  # non-finite micro-batches dropped over the whole run (kept across resume)
        self._window = (0.0, time.perf_counter())  # tokens and start time of the throughput window
        self.data_totals: list[float] = [0.0] * 4  # data_guard's counters over all ranks, as of the last step

    # ---- setup -----------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        cfg = self.cfg
        self.rank, self.world, self.device = init_distributed()
        configure_logging(self.rank)
        self.out_dir = Path(cfg.resolve_path(cfg.output_dir))
        self.ckpt_root = self.out_dir / "checkpoints"
        # Every check that needs no model first (paths, model keys, run folder, resume compatibility).
        self.found = preflight.prepare_run(cfg, self.out_dir, self.rank)
        torch.manual_seed(cfg.seed)  # same initialisation on every rank
        ensure_synthetic_data(cfg, self.rank)
        self.shards = preflight.shard_lists(cfg)
        try:
            self._build_student_side()
        except (ValueError, OSError) as e:  # the model builders name the key; a bad folder is a user error too
            if isinstance(e, UserError):  # already one line naming the key (and the file)
                raise
            raise ConfigError(str(e)) from e
        self._build_teacher_side()
        self._check_data_and_log_summary()
        return self

    def _build_student_side(self) -> None:
        """Models, cache, loss, and the DeepSpeed engine around student + loss (ZeRO, precision, optimizer)."""
        import deepspeed

        cfg = self.cfg
        # On a GPU, models are built there (a 7B model's random init on the CPU took minutes); a ZeRO-3
        # sharded teacher is built on the CPU and partitioned by DeepSpeed.
        on_device = self.device.type == "cuda" and cfg.teacher.placement == "replicated"
        with torch.device(self.device) if on_device else contextlib.nullcontext():
            self.teacher_model, self.student_model = build_models(cfg)
        self.cache = open_teacher_cache(cfg, self.student_model)
        self.vocab_size = len(self.student_model.tokenizer)  # rows compared with the teacher
        self.loss_fn = build_loss_fn(cfg)
        objective = DistillationObjective(self.student_model, self.loss_fn, self.vocab_size, cfg.loss.chunk_size,
                                          zero_stage=int(cfg.deepspeed.zero_stage))
        objective.train()
        self.params = [p for p in objective.parameters() if p.requires_grad]
        optimizer, self.scheduler = build_optimizer(cfg, self.params)
        self.engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=self.scheduler,
                                                    config=student_ds_config(cfg, self.world))
        # DeepSpeed reports the gradient norm under ZeRO and mixed precision; plain fp32 ZeRO-0 we measure
        # ourselves, before the engine clips and zeroes the gradients.
        self.manual_grad_norm = cfg.deepspeed.zero_stage == 0 and cfg.train.precision != "bf16"
        # train.eval_generation: scores the student's greedy answers at each evaluation (None when off)
        self.generation_scorer = build_generation_scorer(cfg, self.student_model, self.engine, self.rank, self.world,
                                                         self.device)

    def _build_teacher_side(self) -> None:
        """The placed teacher (`teacher`, used by evaluation), the one the loss uses (`train_teacher`: None
        for SFT, whose teacher is for evaluation only), and the data loaders that render for them."""
        cfg = self.cfg
        self.teacher = None
        if self.teacher_model is not None:
            self.teacher = place_teacher(cfg, self.teacher_model, self.device, self.world)
        uses_teacher = self.loss_fn.needs_teacher
        self.train_teacher = self.teacher if uses_teacher else None
        self.train_loader, self.make_val_loader = build_loaders(
            cfg, self.shards, self.student_model, self.teacher_model if uses_teacher else None, self.teacher_model,
            self.rank, self.world, self.cache)
        self.train_iter = None
        # sampling.mode: micro-batches replaced by generated completions (train/sampling/); None when off
        self.sampler = build_step_sampler(cfg, self.student_model, self.train_teacher, self.rank, self.world,
                                          self.device, self.engine)

    def _check_data_and_log_summary(self) -> None:
        """An all-bad train or val set fails now (skip reasons listed), not as a hang or a 0.0 metric."""
        loaders = {"train": self.train_loader}
        if self.make_val_loader is not None:
            loaders["val"] = self.make_val_loader()
        for data in loaders.values():
            data.check_usable()
        if self.rank == 0:
            t = self.cfg.train
            samples = {name: data.raw_samples for name, data in loaders.items()}
            for line in summary_lines(self.teacher_model, self.student_model, self.world, t.micro_batch_size,
                                      t.grad_accum, self.cfg.data.max_length, self.shards, samples,
                                      self.cfg.teacher.cache, self.device.type):
                log.info(line)

    # ---- resume ----------------------------------------------------------------------------------
    def resume(self) -> "Trainer":
        """Restore step, engine, schedule, global data position and RNG from the checkpoint that setup
        found (train.resume), on any world size (elastic.py); then open the metrics log at the step
        reached and take the parameter norm the divergence guard compares against."""
        cfg, found = self.cfg, self.found
        if found is not None:
            client = load_engine_checkpoint(self.engine, found, self.world, self.rank)
            self.step = int(client["step"])
            self.dropped_total = int(client.get("dropped_micro_batches", 0))
            self.loss_fn.load_schedule_state(client["schedule"])
            self.train_loader.load_state_dict(client["data"])
            if self.sampler is not None:
                self.sampler.load_state_dict(client.get("sampling"))
            ckpt.set_rng_state(ckpt.load_rank_state(found, self.rank)["rng"])
            changed = apply_optim_config(self.scheduler, cfg.optim)
            log.info("resumed from %s at step %d%s", found, self.step,
                     f"; applied the config's {', '.join(changed)}" if changed else "")
        trackers = open_trackers(cfg, self.out_dir, resumed=found is not None) if self.rank == 0 else None
        self.metrics = MetricsLog(self.out_dir, self.rank == 0, cfg.train.total_steps, self.step,
                                  cfg.train.progress_bar, trackers)
        if found is not None:
            self.metrics.write({"event": "resume", "step": self.step, "checkpoint": str(found)})
        t = cfg.train
        self.guard = DivergenceGuard(t.loss_jump_factor, t.max_zero_grad_steps, t.param_growth_factor)
        self.guard.set_reference(self._parameter_norm())
        return self

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t = self.cfg.train
        if t.eval_at_start and self.step == 0:
            self.last.update(self.evaluate())
        # Resumed at or past the end (a requeued job that had finished, or total_steps lowered): evaluate,
        # but do not write the checkpoint it was resumed from again.
        finished = self.found is not None and self.step >= t.total_steps
        if finished and self.rank == 0:
            log.info("the run is already at step %d (train.total_steps %d): nothing to train; evaluating only",
                     self.step, t.total_steps)
        self._window = (0.0, time.perf_counter())
        with GracefulStop() as stop:  # SIGTERM / SIGINT: finish the step, save, raise TrainingStopped
            try:
                while self.step < t.total_steps:
                    record = self.train_step()
                    check_training_data(self.data_totals, self.cfg.data, self.train_loader.skips.summary())
                    self.guard.after_step(record["step"], record["loss"], record["grad_norm"])
                    self.log_step(record)
                    if _due(self.step, t.eval_every, t.total_steps):
                        self.last.update(self.evaluate())
                    saved = self.save() if _due(self.step, t.save_every, t.total_steps) else None
                    self._stop_if_requested(stop, saved)
            finally:
                self._stop_train_workers()
            self.last.update(self.evaluate())
            if not finished:
                self.save()
        self.close()
        return self.last

    def _stop_train_workers(self) -> None:
        """End the train stream's DataLoader workers now. Left to interpreter exit (the Trainer sits in reference
        cycles, so its stream can outlive fit), multiprocessing would SIGTERM them, which they ignore (a signal to
        the process group must not kill them mid-step), and wait for them forever: the run hung after its end."""
        it, self.train_iter = self.train_iter, None
        if it is not None:
            it.close()  # the generator's frame drops its DataLoader iterator, which shuts its workers down

    def _stop_if_requested(self, stop: GracefulStop, saved: Optional[Path]) -> None:
        """All ranks vote, so all stop after the same step; the checkpoint is written once."""
        votes, signums = all_reduce_sum([1.0 if stop.requested else 0.0, float(stop.signum or 0)], self.device)
        if votes == 0 or self.step >= self.cfg.train.total_steps:
            return
        path = saved or self.save()
        signum = int(round(signums / votes))
        self.metrics.write({"event": "stopped", "step": self.step, "signal": signum})
        self.metrics.close()
        raise TrainingStopped(signum, self.step, str(path))

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its record (the mean loss over all the step's supervised tokens on
        all ranks, sums of tokens over ranks, skipped micro-batches, gradient norm)."""
        if self.train_iter is None:
            self.train_iter = iter(self.train_loader)
        accum, world = self.cfg.train.grad_accum, self.world
        # The step's batches are fetched first: every micro-batch loss is divided by the step's global token count.
        step_batches = [next(self.train_iter) for _ in range(accum)]
        if self.sampler is not None:
            step_batches = self.sampler.prepare_step(step_batches, self.step)
        denominator = step_denominator(step_batches, world, accum, self.device)
        losses, skipped, tokens, supervised, grad_norm = [], 0, 0.0, 0.0, None
        lr = self.scheduler.get_last_lr()[0]  # the LR this step applies (engine.step advances the schedule)
        while len(losses) < accum:
            batch = to_device(step_batches.pop(0) if step_batches else next(self.train_iter), self.device)
            loss = self.micro_batch_loss(batch, denominator)
            value = float(loss.detach())
            if not self._finite_everywhere(value, batch):
                skipped += 1
                self.dropped_total += 1
                continue
            with backward_reduction(self.engine, world):
                self.engine.backward(loss)
            if self.manual_grad_norm and len(losses) == accum - 1:
                grad_norm = _grad_norm(self.params)
            self.engine.step()
            losses.append(value)
            tokens += float(batch["student"]["attention_mask"].sum())
            supervised += float(batch["student"]["loss_targets"].numel())
        self.step += 1
        mean_loss = step_loss(losses, world, accum, self.device)
        self.loss_fn.update(mean_loss, self.step, self.cfg.train.total_steps)
        # one sum over ranks for the step's counts and the data guard's (data_guard.data_counts)
        tokens, supervised, *self.data_totals = all_reduce_sum([tokens, supervised, *data_counts(self.train_loader)],
                                                               self.device)
        if not self.manual_grad_norm:
            grad_norm = self.engine.get_global_grad_norm()
        return {"step": self.step, "loss": mean_loss, "lr": lr, "tokens": tokens, "supervised_tokens": supervised,
                "skipped_micro_batches": skipped, "grad_norm": float(grad_norm) if grad_norm is not None else None}

    def micro_batch_loss(self, batch: dict, denominator: Optional[float] = None) -> torch.Tensor:
        """Teacher side (online, cached or none) -> student forward -> chunked loss, for one micro-batch:
        its token sum over ``denominator`` (objective.step_denominator), or its mean when None."""
        try:
            with teacher_for_batch(self.train_teacher, batch, self.vocab_size) as teacher:
                return self.engine(batch["student"], teacher, denominator=denominator)
        except torch.OutOfMemoryError as e:
            s_in = batch["student"]
            raise RuntimeError(
                f"out of memory at step {self.step + 1}: student input_ids {tuple(s_in['input_ids'].shape)}, "
                f"{s_in['loss_targets'].numel()} supervised tokens, samples {batch['keys'][:4]}; lower "
                "train.micro_batch_size or data.max_length, set loss.chunk_size, enable gradient "
                "checkpointing, or shard the teacher (teacher.placement: zero3)"
            ) from e

    def _finite_everywhere(self, value: float, batch: dict) -> bool:
        """A non-finite micro-batch is dropped on every rank before backward (DeepSpeed never sees it, so
        parameters and optimizer state stay as they were) and replaced by the next one; too many in a
        row stop the run."""
        if all_reduce_sum([0.0 if math.isfinite(value) else 1.0], self.device)[0] == 0:
            self._nonfinite_in_a_row = 0
            return True
        self._nonfinite_in_a_row += 1
        n, limit = self._nonfinite_in_a_row, self.cfg.train.max_nonfinite_in_a_row
        log.warning("step %d: non-finite loss on some rank (here %s, samples %s); micro-batch skipped "
                    "(%d in a row)", self.step + 1, value, batch["keys"][:4], n)
        if n >= limit:
            raise NonFiniteLossError(
                f"{n} micro-batches in a row had a non-finite loss (at step {self.step + 1}); "
                "stopping (train.max_nonfinite_in_a_row). Lower optim.lr, check the teacher and the data, "
                "or train in fp32."
            )
        return False

    def log_step(self, record: dict[str, Any]) -> None:
        """Every train.log_every steps (and the last): metrics.jsonl, TensorBoard, progress bar."""
        tokens, since = self._window
        tokens += record["tokens"]
        self._window = (tokens, since)
        step, total = record["step"], self.cfg.train.total_steps
        if step % self.cfg.train.log_every != 0 and step != total:
            return
        elapsed = time.perf_counter() - since
        self.last = {
            "step": step, "loss": record["loss"], "lr": record["lr"],
            "grad_norm": record["grad_norm"], "tokens_per_s": tokens / max(elapsed, 1e-9),
            "supervised_tokens": record["supervised_tokens"], "skipped_micro_batches": record["skipped_micro_batches"],
            "dropped_micro_batches": self.dropped_total, "skipped_samples": self.train_loader.skips.as_dict(),
            **self._data_counters(),
        }
        if self.loss_fn.t is not None:
            self.last["t"] = self.loss_fn.t
        self.metrics.write(self.last)
        self.metrics.progress(step, record["loss"], self.loss_fn.t, self.last["tokens_per_s"], self.dropped_total)
        self._window = (0.0, time.perf_counter())

    # ---- evaluate, save, close -------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics at the current step (against the teacher when there is one); {} without val data."""
        if self.make_val_loader is None:
            return {}
        scorer = self.generation_scorer.start() if self.generation_scorer is not None else None
        result = evaluate(self.engine.module.student, self.teacher, self.make_val_loader(), self.device,
                          self.vocab_size, self.cfg.train.eval_batches, to_device=lambda b: to_device(b, self.device),
                          progress=f"eval step {self.step}" if self.rank == 0 else None, generation=scorer)
        self.metrics.write({"step": self.step, **result})
        if self.sampler is not None:
            self.sampler.after_eval(result)
        if self.rank == 0:
            log.info("eval step %d: %s", self.step, " ".join(f"{k}={v:.4f}" for k, v in result.items()))
        return result

    def save(self) -> Path:
        """An atomic checkpoint of the current step: engine, schedule, the global data position, each
        rank's RNG. Never of non-finite or blown-up parameters (the guard raises instead)."""
        self.guard.check_before_save(self.step, self._parameter_norm())
        client = {"step": self.step, "schedule": self.loss_fn.schedule_state(), "config": self.cfg.to_dict(),
                  "model_type": self.student_model.kind, "data": self.train_loader.state_dict(),
                  "world_size": self.world, "dropped_micro_batches": self.dropped_total,
                  "sampling": self.sampler.state_dict() if self.sampler is not None else None}
        # Each rank records its own schedule too: a check that every rank holds the same t.
        rank_state = {"rng": ckpt.rng_state(), "schedule": self.loss_fn.schedule_state()}
        path = ckpt.save_checkpoint(self.engine, self.ckpt_root, self.step, client, rank_state, self.rank,
                                    self.cfg.train.keep_last, run_config=self.cfg.to_dict())
        if self.rank == 0:
            log.info("checkpoint %s", path)
        return path

    def _parameter_norm(self) -> float:
        zero3 = self.cfg.deepspeed.zero_stage == 3
        return parameter_norm(self.engine.module, zero3, lambda v: all_reduce_sum(v, self.device))

    def _data_counters(self) -> dict[str, int]:
        """This rank's training samples so far (kept across resume): used, cut to data.max_length, and the
        supervised tokens dropped because the two tokenizers did not align them."""
        stats = self.train_loader.stats
        return {"samples_used": stats.get("samples", 0), "truncated_samples": stats.get("truncated", 0),
                "unaligned_tokens_dropped": stats.get("unaligned_tokens_dropped", 0)}

    def close(self) -> None:
        skips, counts = self.train_loader.skips, self._data_counters()
        if self.rank == 0:
            if skips.total:  # nothing when nothing was skipped
                log.info("%s", skips.summary())
            used, cut = counts["samples_used"], counts["truncated_samples"]
            unaligned = counts["unaligned_tokens_dropped"]
            log.info("samples used%s: %d, %d of them (%.1f %%) cut to data.max_length %d%s",
                     " (rank 0)" if self.world > 1 else "", used, cut, 100.0 * cut / max(used, 1),
                     self.cfg.data.max_length, f"; {unaligned} unaligned supervised tokens dropped" if unaligned else "")
        self.metrics.write({"event": "end", "step": self.step, "skipped_samples": skips.as_dict(), **counts})
        self.metrics.close()


def _due(step: int, every: int, total: int) -> bool:
    """A periodic action at this step (the final step has its own, unconditional one)."""
    return bool(every) and step % every == 0 and step < total


def _grad_norm(params: list) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) a distillation; every rank calls this. Returns the last logged metrics."""
    return Trainer(cfg).setup().resume().fit()
