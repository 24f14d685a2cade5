"""mean_over_ranks with two real gloo processes, and a TAID schedule that stays in sync with it."""

import json

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from taid_vlm.distributed import mean_over_ranks
from taid_vlm.train.launch_env import free_port


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from taid_vlm.losses import build_loss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loss = build_loss("taid", alpha=0.05)
        means, ts = [], []
        for step in range(1, 6):
            local = (rank + 1) * 10.0 / step  # ranks see different local losses
            mean = mean_over_ranks(local)
            loss.update(mean, step, 20)
            means.append(mean)
            ts.append(loss.t)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"means": means, "t": ts}, f)
    finally:
        dist.destroy_process_group()


def test_mean_over_two_gloo_ranks(tmp_path):
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["means"] == pytest.approx([15.0 / s for s in range(1, 6)], rel=1e-12)
    assert r0 == r1  # same averaged loss -> same t on every rank
    assert r0["t"][-1] > r0["t"][0]


def test_mean_is_identity_without_process_group():
    assert mean_over_ranks(3.25) == 3.25
