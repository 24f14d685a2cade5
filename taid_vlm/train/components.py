"""What a run is assembled from, each built from the config by one function: the models, the teacher
(for training, or for evaluation only in an SFT run), the teacher cache, the loss, the optimizer and
its LR schedule, the data loaders. The recipe (trainer.py) calls them in order; the teacher-cache
writer reuses the model and shard pieces."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from taid_vlm.config import ConfigError, OptimConfig, RunConfig
from taid_vlm.losses import DistillationLoss, build_loss
from taid_vlm.models.config_checks import resolve_dtype

from .ds_config import teacher_zero3_config
from .lr_schedule import build_lr_scheduler
from .teacher import Teacher

log = logging.getLogger("taid_vlm.train")


def build_role_model(model_cfg: dict, role: str):
    """`{saved: DIR}` loads a model written by save_pretrained / `taid-vlm export`; anything else builds."""
    from taid_vlm.models import build_model, load_model

    if set(model_cfg) == {"saved"}:
        return load_model(model_cfg["saved"], role=role)
    if "saved" in model_cfg:
        raise ConfigError(f"{role}.model.saved: takes no other keys beside it, got {sorted(model_cfg)}")
    return build_model(model_cfg, role=role, where=f"{role}.model")


def build_models(cfg: RunConfig):
    """(teacher model or None, student model); the student is built first (same initialisation with and
    without a teacher), the teacher checked for a shared vocabulary."""
    from taid_vlm.models import check_vocab_compatible
    from taid_vlm.models.tokenization_check import check_model_export_round_trip

    student = build_role_model(cfg.student.model, "student")
    check_model_export_round_trip(student, "student.model.tokenizer")
    teacher = None
    if cfg.builds_teacher_model():
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


def teacher_dtype(cfg: RunConfig) -> torch.dtype:
    if cfg.teacher.dtype:
        return resolve_dtype(cfg.teacher.dtype, "teacher.dtype")
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def place_teacher(cfg: RunConfig, model, device: torch.device, world: int) -> Teacher:
    """The teacher replicated on this device, or ZeRO-3 sharded over the ranks (teacher.placement)."""
    ds_t = teacher_zero3_config(cfg, world) if cfg.teacher.placement == "zero3" else None
    return Teacher(model, cfg.teacher.placement, device, teacher_dtype(cfg), ds_t)


def open_teacher_cache(cfg: RunConfig, student):
    """`teacher.cache`: the cache, checked against this run (tokenizer, vocab size, rendering, teacher config)."""
    if cfg.teacher_use() != "cache":
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


def build_loss_fn(cfg: RunConfig) -> DistillationLoss:
    kwargs = dict(cfg.loss.params)
    if cfg.loss.ce_weight:
        kwargs["ce_weight"] = cfg.loss.ce_weight
    return build_loss(cfg.loss.name, **kwargs)


def build_optimizer(cfg: RunConfig, params: list):
    """(AdamW over the trainable parameters, its LR schedule); a clear error when nothing trains."""
    if not params:
        raise ConfigError("student.model.freeze: every student parameter is frozen; nothing to train")
    o = cfg.optim
    optimizer = fused_adamw(params, lr=o.lr, **_adamw_settings(o))
    return optimizer, build_lr_scheduler(optimizer, cfg.train.total_steps, o)


def _adamw_settings(o: OptimConfig) -> dict:
    """AdamW's settings from the config, the LR aside (the schedule scales it)."""
    return {"betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}


def apply_optim_config(scheduler: torch.optim.lr_scheduler.LambdaLR, optim: OptimConfig) -> list[str]:
    """After a resume: put this config's lr, betas, eps and weight decay on the optimizer and the schedule.

    Loading a checkpoint restores AdamW's param groups and the schedule's base LR as they were saved, so
    a run resumed with a new `optim.lr` would keep training at the old one, silently. The schedule's
    position (last_epoch) stays the checkpoint's; its shape (warmup, total steps) is already the new
    config's, since the lambda is never saved. Returns what changed, e.g. "optim.lr: 0.001 -> 0.00025".
    """
    groups = scheduler.optimizer.param_groups
    settings = _adamw_settings(optim)
    saved = {"lr": scheduler.base_lrs[0], "betas": tuple(groups[0]["betas"]), "eps": groups[0]["eps"],
             "weight_decay": groups[0]["weight_decay"]}
    wanted = {"lr": optim.lr, **settings}
    changes = [f"optim.{key}: {saved[key]} -> {value}" for key, value in wanted.items() if saved[key] != value]
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    scheduler.base_lrs = [optim.lr] * len(groups)
    for group in groups:
        group.update(settings, initial_lr=optim.lr, lr=optim.lr * factor)
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports (no public setter)
    return changes


def fused_adamw(params: list, **hyper) -> torch.optim.AdamW:
    """torch's AdamW with its fused kernel (one pass over each tensor, no temporaries; CPU since torch 2.4),
    else its default path. The same update up to float rounding: measured over 5 steps on a [151936, 256]
    embedding, <= 2.4e-7 from the per-parameter loop (1-2 ulp of the weights), ~5x faster on a CPU, where
    torch's default is that loop and its [V, H]-sized temporaries."""
    try:
        return torch.optim.AdamW(params, fused=True, **hyper)
    except RuntimeError as e:  # a device or dtype the fused kernel does not support
        log.info("AdamW without fused kernel: %s", e)
        return torch.optim.AdamW(params, **hyper)


def node_cache(cfg: RunConfig):
    """The node-local cache of remote shards (data.cache_dir, data.cache_max_gb, data.fetch_retries); it
    touches the disk only when a shard is remote."""
    from taid_vlm.data.node_cache import NodeCache, default_cache_dir

    root = cfg.resolve_path(cfg.data.cache_dir) if cfg.data.cache_dir is not None else default_cache_dir()
    return NodeCache(root, max_bytes=int(cfg.data.cache_max_gb * 2**30), retries=cfg.data.fetch_retries)


def build_loaders(cfg: RunConfig, shards: dict, student, train_teacher, eval_teacher, rank: int, world: int,
                  cache=None):
    """(train loader, a function that opens a fresh validation loader or None) over ``shards`` (expanded
    once per run: preflight.shard_lists). The train batches carry
    the teacher's rendering only when the loss uses it; the validation batches whenever a teacher exists."""
    from taid_vlm.data import build_loader
    from taid_vlm.data.formats import DEFAULT_CAPTION_INSTRUCTION

    common = dict(
        batch_size=cfg.train.micro_batch_size, max_length=cfg.data.max_length, num_workers=cfg.data.num_workers,
        seed=cfg.seed, rank=rank, world_size=world, text_only=cfg.data.text_only, pack=cfg.data.pack,
        caption_instruction=cfg.data.caption_instruction or DEFAULT_CAPTION_INSTRUCTION,
        shuffle_buffer=cfg.data.shuffle_buffer, companion=cache, shard_cache=node_cache(cfg),
        prompt_tokens=cfg.data.prompt_tokens,
    )
    spec_of = lambda m: m.input_spec if m is not None else None  # noqa: E731
    train = build_loader(shards["train"], student.input_spec, spec_of(train_teacher), mode="train",
                         grad_accum=cfg.train.grad_accum, **common)
    val: Optional[callable] = None
    if cfg.data.val is not None:
        val_common = {**common, "pack": False}
        val = lambda: build_loader(shards["val"], student.input_spec, spec_of(eval_teacher),  # noqa: E731
                                   mode="eval", **val_common)
    return train, val
