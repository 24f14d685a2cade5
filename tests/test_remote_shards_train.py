"""A real 2-process `deepspeed` run (one node: both ranks and their 2 DataLoader workers each share one
node cache) trains and evaluates from `http://127.0.0.1:PORT/...` shards served by a loopback HTTP
server, with the per-step losses and the final eval of the same run from the local copies, and the
server's log shows every shard fetched at most once.

Cost: two 2-process training runs of 3 steps on the tiny text models (~1-2 min on 2 cores)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from http_shard_server import serving
from tests.train_helpers import evals, run, step_losses, train_cmd

pytestmark = pytest.mark.slow

STEPS = 3
COMMON = [f"train.total_steps={STEPS}", "train.micro_batch_size=2", "train.grad_accum=1", "train.eval_batches=2",
          "data.num_workers=2", "data.synthetic=null", "data.shuffle_buffer=16"]


def _train(out: Path, train: str, val: str, *extra: str) -> float:
    start = time.perf_counter()
    run(train_cmd("tiny_text.yaml", out, f"data.train={train}", f"data.val={val}", *COMMON, *extra, nproc=2))
    return time.perf_counter() - start


def test_two_ranks_train_from_http_shards_as_from_local_ones_fetching_each_once(tmp_path):
    from taid_vlm.data.synthetic import synth

    store = tmp_path / "store"
    synth(store, 120, seed=0, val_fraction=0.1, text_only=True, maxcount=27)  # 4 train shards, 1 val shard
    train_shards = sorted(p.name for p in (store / "train").glob("*.tar"))
    assert len(train_shards) == 4
    last = train_shards[-1].split("-")[-1].split(".")[0]
    local_s = _train(tmp_path / "local", str(store / "train"), str(store / "val"))
    with serving(store) as server:
        http_s = _train(tmp_path / "http", f"{server.url}/train/shard-{{000000..{last}}}.tar",
                        f"{server.url}/val/shard-000000.tar", f"data.cache_dir={tmp_path / 'node_cache'}")
        log = list(server.log)
    fetched = {path: sum(1 for p, _ in log if p == path) for path, _ in log}
    print(f"\nlocal run {local_s:.1f} s, http run {http_s:.1f} s; GETs per shard: {fetched}")
    assert fetched and max(fetched.values()) == 1, fetched  # once per node, whatever the ranks x workers
    assert "/val/shard-000000.tar" in fetched and all(status == 200 for _, status in log)
    local, remote = step_losses(tmp_path / "local"), step_losses(tmp_path / "http")
    assert sorted(local) == list(range(1, STEPS + 1)) and remote == local  # same samples, same layout: bitwise
    assert evals(tmp_path / "http")[STEPS]["eval_kl"] == evals(tmp_path / "local")[STEPS]["eval_kl"]
