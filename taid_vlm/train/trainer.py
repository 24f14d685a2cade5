"""The distillation run: teacher forward (no grad) -> student forward -> chunked loss -> DeepSpeed step.

One optimizer step = grad_accum micro-batches per rank. The TAID schedule is updated once per
optimizer step from the loss averaged over the micro-batches and the ranks, so every rank holds the
same t. Read top to bottom: setup, resume, loop, end.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from taid_vlm.config import ConfigError, RunConfig
from taid_vlm.losses import build_loss

from . import checkpoint as ckpt
from . import preflight
from .guard import DivergenceError, DivergenceGuard, parameter_norm
from .run_summary import summary_lines
from .signals import GracefulStop, TrainingStopped
from .ds_config import student_ds_config, teacher_zero3_config
from .elastic import load_engine_checkpoint
from .evaluate import evaluate
from .launch_env import all_reduce_sum, init_distributed
from .lr_schedule import build_lr_scheduler
from .metrics_log import MetricsLog
from .objective import DistillationObjective, step_denominator
from .objective import step_loss as global_step_loss
from .synthetic import ensure_synthetic_data
from .teacher import Teacher

log = logging.getLogger("taid_vlm.train")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NonFiniteLossError(DivergenceError):
    pass


def to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = to_device(v, device)
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        else:
            out[k] = v
    return out


def build_role_model(model_cfg: dict, role: str):
    """`{saved: DIR}` loads a model written by save_pretrained / `taid-vlm export`; anything else builds."""
    from taid_vlm.models import build_model, load_model

    if set(model_cfg) == {"saved"}:
        return load_model(model_cfg["saved"], role=role)
    if "saved" in model_cfg:
        raise ConfigError(f"{role}.model.saved: takes no other keys beside it, got {sorted(model_cfg)}")
    return build_model(model_cfg, role=role, where=f"{role}.model")


def build_models(cfg: RunConfig):
    from taid_vlm.models import check_vocab_compatible

    student = build_role_model(cfg.student.model, "student")
    teacher = None
    if cfg.loss.name != "ce" and cfg.teacher.cache is None:  # a cached teacher is never built
        teacher = build_role_model(cfg.teacher.model, "teacher")
        check_vocab_compatible(teacher, student)
    if cfg.data.pack:  # refuse before any step a model whose packed documents would attend to each other
        from taid_vlm.models.packing import check_packable

        for role, model in (("student", student), ("teacher", teacher)):
            if model is not None:
                try:
                    check_packable(model, f"{role}.model")
                except ValueError as e:
                    raise ConfigError(str(e)) from None
    return teacher, student


def open_teacher_cache(cfg: RunConfig, student):
    """`teacher.cache`: the cache, checked against this run (tokenizer, vocab size, rendering, teacher config)."""
    if cfg.teacher.cache is None or cfg.loss.name == "ce":
        return None
    from taid_vlm.data.formats import DEFAULT_CAPTION_INSTRUCTION
    from taid_vlm.teacher_cache import CacheMismatchError, TeacherCache, check_manifest, vocab_hash

    folder = cfg.resolve_path(cfg.teacher.cache)
    try:
        cache = TeacherCache(folder)
        check_manifest(cache.manifest, folder, vocab=vocab_hash(student.tokenizer), vocab_size=len(student.tokenizer),
                       max_length=cfg.data.max_length, text_only=cfg.data.text_only,
                       caption_instruction=cfg.data.caption_instruction or DEFAULT_CAPTION_INSTRUCTION,
                       teacher_model=cfg.teacher.model)
    except CacheMismatchError as e:
        raise ConfigError(f"teacher.cache: {e}") from None
    log.info("teacher from cache %s (k=%d, V=%d, teacher weights %s)", folder, cache.k, cache.vocab_size,
             cache.manifest["teacher"]["weights_fingerprint"][:23])
    return cache


def build_loaders(cfg: RunConfig, student, teacher, rank: int, world: int, cache=None):
    from taid_vlm.data import build_loader
    from taid_vlm.data.formats import DEFAULT_CAPTION_INSTRUCTION

    common = dict(
        batch_size=cfg.train.micro_batch_size, max_length=cfg.data.max_length, num_workers=cfg.data.num_workers,
        seed=cfg.seed, rank=rank, world_size=world, text_only=cfg.data.text_only, pack=cfg.data.pack,
        caption_instruction=cfg.data.caption_instruction or DEFAULT_CAPTION_INSTRUCTION,
        shuffle_buffer=cfg.data.shuffle_buffer, companion=cache,
    )
    t_spec = teacher.input_spec if teacher is not None else None
    train = build_loader(_shards(cfg, cfg.data.train), student.input_spec, t_spec, mode="train",
                         grad_accum=cfg.train.grad_accum, **common)
    val = None
    if cfg.data.val is not None:
        val_common = {**common, "pack": False}
        val = lambda: build_loader(_shards(cfg, cfg.data.val), student.input_spec, t_spec, mode="eval", **val_common)  # noqa: E731
    return train, val


def _shards(cfg: RunConfig, spec):
    if isinstance(spec, list):
        return [cfg.resolve_path(s) for s in spec]
    if isinstance(spec, str) and "," in spec and "{" not in spec:
        return [cfg.resolve_path(s.strip()) for s in spec.split(",")]
    return cfg.resolve_path(spec)


def _trainable_params(module: torch.nn.Module):
    return [p for p in module.parameters() if p.requires_grad]


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) a distillation; every rank calls this. Returns the last logged metrics."""
    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out_dir = Path(cfg.resolve_path(cfg.output_dir))
    ckpt_root = out_dir / "checkpoints"
    found = preflight.prepare_run(cfg, out_dir, rank)  # [H6] checks before anything heavy; the run folder
    torch.manual_seed(cfg.seed)  # same initialisation on every rank
    ensure_synthetic_data(cfg, rank)
    shards = preflight.shard_lists(cfg)  # [H6] train AND val shards exist

    # ---- models, loss, engines -----------------------------------------------------------------
    try:
        teacher_model, student_model = build_models(cfg)
    except (ValueError, OSError) as e:  # [H6] the model builders name the key; a bad folder is a user error too
        raise ConfigError(str(e)) from e
    cache = open_teacher_cache(cfg, student_model)
    bf16 = cfg.train.precision == "bf16"
    vocab_size = len(student_model.tokenizer)
    loss_kwargs = dict(cfg.loss.params)
    if cfg.loss.ce_weight:
        loss_kwargs["ce_weight"] = cfg.loss.ce_weight
    loss_fn = build_loss(cfg.loss.name, **loss_kwargs)
    objective = DistillationObjective(student_model, loss_fn, vocab_size, cfg.loss.chunk_size)
    objective.train()
    params = _trainable_params(objective)
    if not params:
        raise ConfigError("student.model.freeze: every student parameter is frozen; nothing to train")
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = build_lr_scheduler(optimizer, cfg.train.total_steps, cfg.optim)

    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=student_ds_config(cfg, world))
    teacher = None
    if teacher_model is not None:
        t_dtype = DTYPES[cfg.teacher.dtype] if cfg.teacher.dtype else (torch.bfloat16 if bf16 else torch.float32)
        ds_t = teacher_zero3_config(cfg, world) if cfg.teacher.placement == "zero3" else None
        teacher = Teacher(teacher_model, cfg.teacher.placement, device, t_dtype, ds_t)
    train_loader, make_val_loader = build_loaders(cfg, student_model, teacher_model, rank, world, cache)
    for data in [train_loader] + ([make_val_loader()] if make_val_loader is not None else []):
        data.check_usable()  # an all-bad set fails now (reasons listed), not as a hang or a 0.0 metric
    if rank == 0:  # [H6]
        for line in summary_lines(teacher_model, student_model, world, cfg.train.micro_batch_size, cfg.train.grad_accum,
                                  cfg.data.max_length, shards, cfg.teacher.cache):
            log.info(line)

    # ---- resume ----------------------------------------------------------------------------------
    step = 0
    dropped_total = 0
    if found is not None:
        client = load_engine_checkpoint(engine, found, world, rank)  # any world size (elastic.py)
        step = int(client["step"])
        dropped_total = int(client.get("dropped_micro_batches", 0))
        loss_fn.load_schedule_state(client["schedule"])
        rank_state = ckpt.load_rank_state(found, rank)
        train_loader.load_state_dict(client["data"])
        ckpt.set_rng_state(rank_state["rng"])
        log.info("resumed from %s at step %d", found, step)

    metrics = MetricsLog(out_dir, rank == 0, cfg.train.total_steps, step, cfg.train.progress_bar, cfg.train.tensorboard)
    if found is not None:
        metrics.write({"event": "resume", "step": step, "checkpoint": str(found)})

    zero3 = cfg.deepspeed.zero_stage == 3
    guard = DivergenceGuard(cfg.train.loss_jump_factor, cfg.train.max_zero_grad_steps, cfg.train.param_growth_factor)
    guard.set_reference(parameter_norm(engine.module, zero3, lambda v: all_reduce_sum(v, device)))  # [H6]

    def save(at_step: int) -> Path:
        # [H6] never write non-finite or blown-up parameters
        guard.check_before_save(at_step, parameter_norm(engine.module, zero3, lambda v: all_reduce_sum(v, device)))
        client = {"step": at_step, "schedule": loss_fn.schedule_state(), "config": cfg.to_dict(),
                  "model_type": student_model.kind, "data": train_loader.state_dict(), "world_size": world,
                  "dropped_micro_batches": dropped_total}
        # Each rank records its own schedule too: a check that every rank holds the same t.
        rank_state = {"rng": ckpt.rng_state(), "schedule": loss_fn.schedule_state()}
        path = ckpt.save_checkpoint(engine, ckpt_root, at_step, client, rank_state, rank, cfg.train.keep_last,
                                    run_config=cfg.to_dict())
        if rank == 0:
            log.info("checkpoint %s", path)
        return path

    def run_eval(at_step: int) -> dict[str, float]:
        if make_val_loader is None:
            return {}
        result = evaluate(engine.module, teacher, make_val_loader(),
                          device, vocab_size, cfg.train.eval_batches, to_device=lambda b: to_device(b, device))
        metrics.write({"step": at_step, **result})
        if rank == 0:
            log.info("eval step %d: %s", at_step, " ".join(f"{k}={v:.4f}" for k, v in result.items()))
        return result

    # ---- loop ------------------------------------------------------------------------------------
    def forward(batch: dict, denominator: float) -> torch.Tensor:
        if "teacher_topk" in batch:
            return engine(batch["student"], teacher_topk=batch["teacher_topk"], denominator=denominator)
        if teacher is None:
            return engine(batch["student"], denominator=denominator)
        h_t = teacher.hidden(batch["teacher"])
        with teacher.output_weight() as w_t:
            return engine(batch["student"], h_t, w_t, denominator=denominator)

    total = cfg.train.total_steps
    train_iter = iter(train_loader)
    nonfinite_in_a_row = 0
    last: dict[str, Any] = {}
    tokens_window, time_window = 0.0, time.perf_counter()
    # DeepSpeed reports the gradient norm under ZeRO and mixed precision; plain fp32 ZeRO-0 we measure
    # ourselves, before the engine clips and zeroes the gradients.
    manual_grad_norm = cfg.deepspeed.zero_stage == 0 and not bf16
    if cfg.train.eval_at_start and step == 0:
        last.update(run_eval(0))
    stop = GracefulStop().install()  # [H6] SIGTERM/SIGINT: finish the step, save, exit
    while step < total:
        step_grad_norm = None
        micro_losses, skipped = [], 0
        step_tokens, step_supervised = 0.0, 0.0
        step_batches = [next(train_iter) for _ in range(cfg.train.grad_accum)]
        denominator = step_denominator(step_batches, world, cfg.train.grad_accum, device)
        while len(micro_losses) < cfg.train.grad_accum:
            batch = to_device(step_batches.pop(0) if step_batches else next(train_iter), device)
            s_in = batch["student"]
            try:
                loss = forward(batch, denominator)
            except torch.OutOfMemoryError as e:
                raise RuntimeError(
                    f"out of memory at step {step + 1}: student input_ids {tuple(s_in['input_ids'].shape)}, "
                    f"{s_in['loss_targets'].numel()} supervised tokens, samples {batch['keys'][:4]}; lower "
                    "train.micro_batch_size or data.max_length, set loss.chunk_size, enable gradient "
                    "checkpointing, or shard the teacher (teacher.placement: zero3)"
                ) from e
            value = float(loss.detach())
            # A non-finite micro-batch is dropped on every rank before backward (DeepSpeed never sees it,
            # so the parameters and optimizer state stay as they were) and replaced by the next one.
            if all_reduce_sum([0.0 if math.isfinite(value) else 1.0], device)[0] > 0:
                skipped += 1
                dropped_total += 1
                nonfinite_in_a_row += 1
                log.warning("step %d: non-finite loss on some rank (here %s, samples %s); micro-batch skipped "
                            "(%d in a row)", step + 1, value, batch["keys"][:4], nonfinite_in_a_row)
                if nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                    raise NonFiniteLossError(
                        f"{nonfinite_in_a_row} micro-batches in a row had a non-finite loss (at step {step + 1}); "
                        "stopping (train.max_nonfinite_in_a_row). Lower optim.lr, check the teacher and the data, "
                        "or train in fp32."
                    )
                continue
            nonfinite_in_a_row = 0
            engine.backward(loss)
            if manual_grad_norm and len(micro_losses) == cfg.train.grad_accum - 1:
                grads = [p.grad for p in params if p.grad is not None]
                step_grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            engine.step()
            micro_losses.append(value)
            step_tokens += float(s_in["attention_mask"].sum())
            step_supervised += float(s_in["loss_targets"].numel())
        step += 1
        step_loss = global_step_loss(micro_losses, world, cfg.train.grad_accum, device)
        loss_fn.update(step_loss, step, total)

        tok, sup = all_reduce_sum([step_tokens, step_supervised], device)
        tokens_window += tok
        grad_norm = step_grad_norm if manual_grad_norm else engine.get_global_grad_norm()
        guard.after_step(step, step_loss, float(grad_norm) if grad_norm is not None else None)  # [H6]
        if step % cfg.train.log_every == 0 or step == total:
            elapsed = time.perf_counter() - time_window
            last = {
                "step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": tokens_window / max(elapsed, 1e-9), "supervised_tokens": sup,
                "skipped_micro_batches": skipped, "dropped_micro_batches": dropped_total,
                "skipped_samples": train_loader.skips.as_dict(),
            }
            if loss_fn.t is not None:
                last["t"] = loss_fn.t
            metrics.write(last)
            metrics.progress(step, step_loss, loss_fn.t, last["tokens_per_s"], dropped_total)
            tokens_window, time_window = 0.0, time.perf_counter()
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total:
            last.update(run_eval(step))
        saved_now = None
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total:
            saved_now = save(step)
        votes, signums = all_reduce_sum([1.0 if stop.requested else 0.0, float(stop.signum or 0)], device)
        if votes > 0 and step < total:  # [H6] every rank stops after the same step
            path = saved_now or save(step)
            metrics.write({"event": "stopped", "step": step, "signal": int(round(signums / votes))})
            metrics.close()
            raise TrainingStopped(int(round(signums / votes)), step, str(path))

    # ---- end -------------------------------------------------------------------------------------
    last.update(run_eval(step))
    save(step)
    stop.uninstall()
    if rank == 0:
        log.info("skipped samples: %s", train_loader.skips.summary())
    metrics.write({"event": "end", "step": step, "skipped_samples": train_loader.skips.as_dict()})
    metrics.close()
    return last
