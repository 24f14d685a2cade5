"""Resume a DeepSpeed checkpoint on another number of processes.

ZeRO-1/2/3 checkpoints hold the optimizer state (and under ZeRO-3 the weights) partitioned over the
ranks that wrote them. When the world size changed, rank 0 converts the checkpoint once into
DeepSpeed's universal format (deepspeed.checkpoint.ds_to_universal: one fp32 file per parameter with
its Adam moments) inside the checkpoint folder, and every rank loads that with
``load_universal_checkpoint``: weights, optimizer moments and step counts continue exactly. A ZeRO-0
checkpoint holds everything unpartitioned and loads as it is. The data position needs nothing here:
it is one global counter in the client state (taid_vlm.data.global_order).
"""

from __future__ import annotations

import logging
import re
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Optional

from .launch_env import barrier

log = logging.getLogger(__name__)

UNIVERSAL = "universal"
_PARTITION = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def saved_world_size(checkpoint: Path) -> Optional[int]:
    """How many data-parallel ranks wrote this checkpoint's ZeRO partitions (None: not partitioned)."""
    ranks = {int(m.group(1)) for p in Path(checkpoint).iterdir() if (m := _PARTITION.search(p.name))}
    return max(ranks) + 1 if ranks else None


def _converter_input(checkpoint: Path, folder: Path) -> None:
    """``folder`` <- the checkpoint as ds_to_universal can read it: links to its files, except that the
    model-state files lose their non-tensor module entries (the loss's schedule, an nn.Module extra
    state), which the converter would try to turn into fp32 tensors."""
    import torch

    folder.mkdir(parents=True)
    for f in checkpoint.iterdir():
        if not f.is_file():
            continue
        if re.fullmatch(r"mp_rank_\d+_model_states\.pt", f.name):
            state = torch.load(f, map_location="cpu", weights_only=False)
            if isinstance(state.get("module"), dict):
                state["module"] = {k: v for k, v in state["module"].items() if isinstance(v, torch.Tensor)}
            torch.save(state, folder / f.name)
        else:
            (folder / f.name).symlink_to(f.resolve())


def _convert_to_universal(checkpoint: Path) -> Path:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = checkpoint / UNIVERSAL
    if (out / "COMPLETE").is_file():
        return out
    inp, tmp = checkpoint / f".{UNIVERSAL}-input", checkpoint / f".{UNIVERSAL}-tmp"
    for stale in (inp, tmp):
        shutil.rmtree(stale, ignore_errors=True)
    _converter_input(checkpoint, inp)
    try:
        ds_to_universal(Namespace(input_folder=str(inp), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    finally:
        shutil.rmtree(inp, ignore_errors=True)
    for f in checkpoint.glob("mp_rank_*_model_states.pt"):  # the originals, with the full module state
        shutil.copy2(f, tmp / f.name)
    (tmp / "COMPLETE").write_text("\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load_engine_checkpoint(engine, checkpoint: Path, world_size: int, rank: int) -> dict:
    """``engine.load_checkpoint`` of one complete checkpoint folder; returns the client state. Works
    whatever world size wrote it (see the module docstring)."""
    checkpoint = Path(checkpoint)
    saved = saved_world_size(checkpoint)
    if saved is None or saved == world_size:
        _, client = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    else:
        if rank == 0:
            log.info("checkpoint %s was written by %d ranks, this run has %d: loading it through DeepSpeed's "
                     "universal checkpoint format (%s/%s)", checkpoint, saved, world_size, checkpoint.name, UNIVERSAL)
            _convert_to_universal(checkpoint)
        barrier()
        engine._config.load_universal_checkpoint = True  # read by engine.load_checkpoint (no public setter)
        try:
            _, client = engine.load_checkpoint(str(checkpoint), tag=UNIVERSAL)
        finally:
            engine._config.load_universal_checkpoint = False
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {checkpoint}")
    return client
