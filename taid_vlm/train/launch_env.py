"""Process-group setup that works both under a launcher (deepspeed, torchrun) and in one plain process,
and the process's logging (INFO on rank 0, warnings only on the others)."""

from __future__ import annotations

import logging
import os
import socket

import torch


def free_port() -> int:
    """A TCP port on localhost that is free right now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configure_logging(rank: int = -1) -> None:
    """Rank 0 logs INFO, other ranks WARNING; ``rank`` -1: from the launcher's RANK (0 without one).
    The first call wins (logging.basicConfig), so lines logged before the process group exists look alike."""
    rank = int(os.environ.get("RANK", "0")) if rank < 0 else rank
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def quiet_library_notices() -> None:
    """Notices of the libraries that no user can act on, printed by every command (and every rank):
    DeepSpeed's 'Setting accelerator to CPU' on a machine without a GPU (the run summary says the
    device once), torch's FutureWarnings about the collectives DeepSpeed's ZeRO-3 calls."""
    import warnings

    if "DS_ACCELERATOR" not in os.environ:
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's choice anyway, without its warning
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def import_deepspeed():
    """``import deepspeed`` without the mlflow import it makes only for its autotuner (never run here).

    deepspeed/__init__ imports deepspeed.autotuning, which imports mlflow when it is installed (it is:
    ``train.report_to: mlflow``): 1.2 s of CPU per process start, every rank of every run (measured
    ``import deepspeed``: 3.0 s user -> 1.8 s). A ``None`` in sys.modules makes that import fail as if mlflow
    were absent; it is removed at once, so the mlflow tracker imports the real package later."""
    import sys

    hide = "mlflow" not in sys.modules and "deepspeed" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None
    try:
        import deepspeed
    finally:
        if hide and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed


def skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op (``deepspeed_shm_comm``).

    DeepSpeed's comm backend builds that op with g++ at the first init of every process that finds no
    build, into a per-user cache that other checkouts overwrite (measured 150-300 s per start on a busy
    2-core machine). The op only serves ``inference_all_reduce`` (tensor-parallel inference), which this
    project never runs, and DeepSpeed falls back to torch.distributed without it (as on non-Linux).
    ``build_shm_op`` only loads ops marked compatible in ``deepspeed.ops.__compatible_ops__``, a dict
    probed once per process that keeps edits, so marking it incompatible avoids the compile.
    Call before the first ``deepspeed.init_distributed`` / ``deepspeed.initialize``."""
    import_deepspeed().ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed; return (rank, world_size, device).

    Without launcher variables this is a world of one on localhost: DeepSpeed would otherwise try MPI
    discovery. NCCL on GPUs, gloo on CPU (DeepSpeed's CPU accelerator picks it).
    """
    import torch.distributed as dist

    deepspeed = import_deepspeed()
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    skip_deepspeed_shm_op()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size(), device


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a list of floats over ranks (identity in one process)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [float(v) for v in values]
    buf = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    return buf.tolist()
