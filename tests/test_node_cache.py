"""The node-local cache of remote shards (taid_vlm/data/node_cache.py) against a real HTTP server on
127.0.0.1 and real ``pipe:`` commands: one fetch per node whatever the number of processes asking, the
size limit, bounded retries then a counted ``fetch_error`` skip, and no partial file ever under the
cached name."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import re
import signal
import time
from pathlib import Path

import pytest

from data_helpers import write_caption_shards
from http_shard_server import serving
from taid_vlm.data import FetchError, NodeCache, build_index, build_loader, write_index
from taid_vlm.data import shard_io
from taid_vlm.data.shard_io import read_shard, use_node_cache
from taid_vlm.data.skips import SkipCounter


def _cache(root: Path, max_bytes: int = 1 << 30, **kw) -> NodeCache:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("read_timeout_s", 10.0)
    return NodeCache(str(root), max_bytes, **kw)


def _cached_files(root: Path) -> list[str]:
    return sorted(p.name.split("-", 1)[1] for p in root.iterdir() if not p.name.startswith("."))


@pytest.fixture
def shards(tmp_path) -> list[str]:
    """Caption shards and their index (a remote shard's index is read from beside it: data_tools.index_shards)."""
    paths = write_caption_shards(tmp_path / "store", 4, 6)
    write_index([build_index(p) for p in paths])
    return paths


def test_a_local_path_is_used_as_it_is_and_nothing_is_cached(tmp_path, shards):
    cache = _cache(tmp_path / "cache")
    assert cache.local_path(shards[0]) == shards[0]
    with cache.open(shards[0]) as f:
        assert f.read() == Path(shards[0]).read_bytes()
    assert not (tmp_path / "cache").exists()


def test_http_and_pipe_shards_are_fetched_once_then_read_locally(tmp_path, shards):
    cache = _cache(tmp_path / "cache")
    with serving(tmp_path / "store") as server:
        url = f"{server.url}/shard-000000.tar"
        first = cache.local_path(url)
        assert Path(first).read_bytes() == Path(shards[0]).read_bytes()
        with cache.open(url) as f:
            assert f.read() == Path(shards[0]).read_bytes()
        assert cache.local_path(url) == first and server.gets("/shard-000000.tar") == 1
    runs = tmp_path / "runs.txt"  # the command appends a line each time it runs
    url = f"pipe:echo run >> {runs}; cat {shards[1]}"
    for _ in range(3):
        assert Path(cache.local_path(url)).read_bytes() == Path(shards[1]).read_bytes()
    assert runs.read_text() == "run\n"
    assert _cached_files(tmp_path / "cache") == ["shard-000000.tar", "shard-000001.tar"]


def _ask(root: str, url: str, barrier, out) -> None:
    barrier.wait()  # every process asks at the same moment
    out.put(hashlib.sha256(Path(NodeCache(root, 1 << 30).local_path(url)).read_bytes()).hexdigest())


def test_processes_asking_for_one_shard_at_once_share_one_fetch(tmp_path, shards):
    ctx = mp.get_context("fork")
    n = 4
    barrier, out = ctx.Barrier(n), ctx.Queue()
    with serving(tmp_path / "store") as server:
        server.delay_s = 1.0  # the first fetch is still running when the others ask
        url = f"{server.url}/shard-000002.tar"
        procs = [ctx.Process(target=_ask, args=(str(tmp_path / "cache"), url, barrier, out)) for _ in range(n)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        assert [p.exitcode for p in procs] == [0] * n
        assert server.gets("/shard-000002.tar") == 1  # the server log: one fetch for the node
    got = [out.get() for _ in range(n)]
    assert got == [hashlib.sha256(Path(shards[2]).read_bytes()).hexdigest()] * n


def test_least_recently_used_files_not_in_use_are_evicted_beyond_the_size_limit(tmp_path, shards):
    size = os.path.getsize(shards[0])
    assert all(os.path.getsize(s) == size for s in shards)
    root = tmp_path / "cache"
    cache = _cache(root, max_bytes=int(2.5 * size))
    url = lambda i: f"pipe:cat {shards[i]}"  # noqa: E731
    cache.local_path(url(0))
    time.sleep(0.01)
    cache.local_path(url(1))
    time.sleep(0.01)
    cache.local_path(url(0))  # used again: shard 1 is now the least recently used
    time.sleep(0.01)
    cache.local_path(url(2))
    assert _cached_files(root) == ["shard-000000.tar", "shard-000002.tar"]
    held = cache.open(url(0))  # in use: stays although it is now the least recently used
    time.sleep(0.01)
    cache.local_path(url(3))
    assert _cached_files(root) == ["shard-000000.tar", "shard-000003.tar"]
    assert held.read() == Path(shards[0]).read_bytes()
    held.close()
    assert cache.evict() == 2 * size


def test_a_shard_larger_than_the_limit_is_fetched_read_and_then_evicted_first(tmp_path, shards):
    root = tmp_path / "cache"
    cache = _cache(root, max_bytes=os.path.getsize(shards[0]) // 2)
    with cache.open(f"pipe:cat {shards[0]}") as f:
        assert f.read() == Path(shards[0]).read_bytes()
        assert _cached_files(root) == ["shard-000000.tar"]
    assert cache.evict() == 0 and _cached_files(root) == []


def test_a_404_is_retried_a_bounded_number_of_times_then_fails_once_per_node(tmp_path, shards):
    cache = _cache(tmp_path / "cache", retries=2)
    with serving(tmp_path / "store") as server:
        server.not_found["/shard-000001.tar"] = 1  # a transient 404: the retry gets it
        assert Path(cache.local_path(f"{server.url}/shard-000001.tar")).read_bytes() == Path(shards[1]).read_bytes()
        assert server.log == [("/shard-000001.tar", 404), ("/shard-000001.tar", 200)]
        server.not_found["/gone.tar"] = 99
        with pytest.raises(FetchError, match=r"could not fetch http://127\.0\.0\.1:\d+/gone\.tar: HTTP 404 .*3 att"):
            cache.local_path(f"{server.url}/gone.tar")
        assert server.gets("/gone.tar") == 3  # 1 + retries, then it gives up
        with pytest.raises(FetchError, match="HTTP 404"):  # another caller on the node: the same answer
            cache.open(f"{server.url}/gone.tar")
        assert server.gets("/gone.tar") == 3
        with pytest.raises(FetchError):  # once the failure is older than failure_ttl_s: tried anew
            _cache(tmp_path / "cache", retries=0, failure_ttl_s=0).local_path(f"{server.url}/gone.tar")
        assert server.gets("/gone.tar") == 4


def test_a_transfer_cut_short_never_becomes_visible(tmp_path, shards):
    root = tmp_path / "cache"
    cache = _cache(root, retries=1)
    with serving(tmp_path / "store") as server:
        server.cut_at["/shard-000003.tar"] = 5000
        url = f"{server.url}/shard-000003.tar"
        with pytest.raises(FetchError, match="shard-000003.tar: .*2 attempts"):
            cache.local_path(url)
        assert server.gets("/shard-000003.tar") == 2
        assert _cached_files(root) == [] and not list(root.glob(".*part*"))
        del server.cut_at["/shard-000003.tar"]
        ok = _cache(root, failure_ttl_s=0).local_path(url)
        assert Path(ok).read_bytes() == Path(shards[3]).read_bytes()


def _fetch_forever(root: str, url: str) -> None:
    NodeCache(root, 1 << 30).local_path(url)


def test_a_fetcher_killed_mid_transfer_leaves_no_cached_file_and_the_next_one_fetches_it_whole(tmp_path):
    root, big = tmp_path / "cache", tmp_path / "store" / "big.tar"
    big.parent.mkdir()
    big.write_bytes(os.urandom(3 << 20))  # more than the fetcher's 1 MiB write: a part file grows
    with serving(tmp_path / "store") as server:
        server.chunk_bytes, server.chunk_delay_s = 256 << 10, 0.2  # ~2.4 s for the whole file
        url = f"{server.url}/big.tar"
        proc = mp.get_context("fork").Process(target=_fetch_forever, args=(str(root), url))
        proc.start()
        while not [p for p in root.glob(".*part*") if p.stat().st_size > 0]:
            assert proc.exitcode is None, "the fetch ended before it could be interrupted"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert _cached_files(root) == [] and len(list(root.glob(".*part*"))) == 1
        server.chunk_delay_s = 0.0
        path = _cache(root).local_path(url)
    assert Path(path).read_bytes() == big.read_bytes()
    assert not list(root.glob(".*part*"))  # the dead fetcher's temporary file is gone


def test_commands_that_fail_or_hang_and_servers_that_stall_end_in_fetch_errors(tmp_path, shards):
    cache = _cache(tmp_path / "cache", retries=0, pipe_timeout_s=0.5, read_timeout_s=0.5)
    with pytest.raises(FetchError, match=r"could not fetch pipe:cat /no/such\.tar: command exited with status 1"):
        cache.local_path("pipe:cat /no/such.tar")
    with pytest.raises(FetchError, match="still running after 0.5 s"):
        cache.local_path("pipe:sleep 30")
    with pytest.raises(FetchError, match=r"s3:// is read with pipe:aws s3 cp"):
        cache.local_path("s3://bucket/shard.tar")
    with serving(tmp_path / "store") as server:
        server.delay_s = 3.0
        with pytest.raises(FetchError, match="ReadTimeout"):
            cache.local_path(f"{server.url}/shard-000000.tar")


def test_the_loader_counts_an_unfetchable_shard_and_reads_the_others(tmp_path, shards, tiny_tokenizer):
    from data_helpers import student_spec, teacher_spec

    cache = _cache(tmp_path / "cache", retries=1)
    with serving(tmp_path / "store") as server:
        server.not_found["/shard-000001.tar"] = 99
        urls = [f"{server.url}/shard-{i:06d}.tar" for i in range(3)]
        skips = SkipCounter()
        use_node_cache(cache)  # build_loader sets it too; read_shard alone reads through this process's cache
        assert list(read_shard(urls[1], skips)) == []
        assert skips.as_dict() == {"fetch_error": 1} and skips.examples["fetch_error"] == [urls[1]]
        loader = build_loader(urls, student_spec(tiny_tokenizer), teacher_spec(tiny_tokenizer), mode="eval",
                              batch_size=4, max_length=256, num_workers=2, shard_cache=cache)
        keys = sorted(k for batch in loader for k in batch["keys"])
        assert server.gets("/shard-000001.tar") == 2  # the first read's two attempts; then the failure marker
        assert server.gets("/shard-000000.tar") == server.gets("/shard-000002.tar") == 1
    assert keys == [f"s{s}_{i:03d}" for s in (0, 2) for i in range(6)]
    assert loader.skips.as_dict() == {"fetch_error": 6}  # each of its 6 indexed samples, one fetch


def test_the_cache_settings_come_from_the_config_and_remote_specs_stay_urls(tmp_path):
    from taid_vlm.config import ConfigError, load_config
    from taid_vlm.data import default_cache_dir
    from taid_vlm.train.components import node_cache
    from taid_vlm.train.preflight import shard_lists
    from tests.train_helpers import CONFIGS

    spec = "http://127.0.0.1:8000/shard-{000000..000003}.tar"
    cfg = load_config(CONFIGS / "tiny_text.yaml", [f"data.train={spec}", "data.val=pipe:cat v.tar"])
    assert cfg.shard_spec("train") == [spec] and cfg.shard_spec("val") == ["pipe:cat v.tar"]
    assert shard_lists(cfg)["train"] == [spec.replace("{000000..000003}", f"{i:06d}") for i in range(4)]
    assert node_cache(cfg) == NodeCache(default_cache_dir(), 64 << 30, retries=3)
    use_node_cache(None)  # the config's defaults are those of a process with no configured cache (data tools)
    try:
        assert shard_io.node_cache() == node_cache(cfg)
    finally:
        use_node_cache(None)
    cfg = load_config(CONFIGS / "tiny_text.yaml", ["data.cache_dir=shard_cache", "data.cache_max_gb=0.5",
                                                   "data.fetch_retries=0"])
    assert node_cache(cfg) == NodeCache(str(Path.cwd() / "shard_cache"), 1 << 29, retries=0)
    with pytest.raises(ConfigError, match=r"data.cache_max_gb: must be > 0, got 0"):
        load_config(CONFIGS / "tiny_text.yaml", ["data.cache_max_gb=0"])
    with pytest.raises(ConfigError, match=r"data.fetch_retries: must be >= 0, got -1"):
        load_config(CONFIGS / "tiny_text.yaml", ["data.fetch_retries=-1"])


def test_a_train_stream_whose_shards_all_fail_to_fetch_stops_naming_them(tmp_path, shards, tiny_tokenizer):
    from data_helpers import student_spec, teacher_spec
    from taid_vlm.data import NoUsableSampleError

    cache = _cache(tmp_path / "cache", retries=0)
    with serving(tmp_path / "store") as server:
        server.not_found.update({"/shard-000000.tar": 99, "/shard-000001.tar": 99})
        urls = [f"{server.url}/shard-00000{i}.tar" for i in range(2)]
        loader = build_loader(urls, student_spec(tiny_tokenizer), teacher_spec(tiny_tokenizer), mode="train",
                              batch_size=2, num_workers=0, shard_cache=cache)
        with pytest.raises(NoUsableSampleError, match=r"fetch_error=\d+ \[http://127.0.0.1:\d+/shard-00000[01].tar#"):
            next(iter(loader))
        # one GET each (the index came from beside them); then the node's failure markers answer
        assert server.gets("/shard-000000.tar") == server.gets("/shard-000001.tar") == 1


def test_a_remote_shard_without_an_index_is_one_error_naming_it_and_the_command(tmp_path, tiny_tokenizer):
    from data_helpers import student_spec
    from taid_vlm.data.shard_index import StaleIndexError

    write_caption_shards(tmp_path / "bare", 1, 2)  # no index written
    with serving(tmp_path / "bare") as server:
        url = f"{server.url}/shard-000000.tar"
        with pytest.raises(StaleIndexError, match=rf"remote shard {re.escape(url)} has no index next to it .*index_shards"):
            build_loader([url], student_spec(tiny_tokenizer), mode="train", batch_size=2, num_workers=0,
                         shard_cache=_cache(tmp_path / "cache", retries=0))
        assert server.gets("/shard-000000.tar") == 0  # start-up reads index files only
