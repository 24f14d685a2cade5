"""The start-up summary counts samples as the loader reads them, from the shard index."""

from __future__ import annotations

import webdataset as wds

from taid_vlm.data.shard_index import SIDECAR_SUFFIX, SUMMARY_NAME, load_indexes
from taid_vlm.train.run_summary import count_samples, summary_lines


def _shard(path, keys):
    with wds.TarWriter(str(path)) as w:
        for k in keys:
            w.write({"__key__": k, "txt": b"a doc"})
    return str(path)


def test_count_is_the_indexed_raw_samples_and_writes_nothing(tmp_path):
    a = _shard(tmp_path / "a.tar", ["s0", "s1", "s2"])
    b = _shard(tmp_path / "b.tar", ["t0", "t1"])
    assert count_samples([a, b]) == 5
    assert not (tmp_path / SUMMARY_NAME).exists() and not (tmp_path / f"a.tar{SIDECAR_SUFFIX}").exists()
    load_indexes([a, b])  # what the loader does at start: written next to the shards
    (tmp_path / "b.tar").write_bytes((tmp_path / "b.tar").read_bytes())  # same bytes, new mtime: stale, re-walked
    assert count_samples([a, b]) == 5


def test_a_remote_shard_without_an_index_is_unknown_not_an_error(tmp_path):
    assert count_samples(["http://127.0.0.1:9/none.tar"]) is None
    line = summary_lines(None, None, 1, 2, 1, 64, {"train": ["http://127.0.0.1:9/none.tar"]})[-1]
    assert line == "data.train: 1 shard (http://127.0.0.1:9/none.tar), sample count unknown"


def test_summary_names_the_shards_and_their_samples(tmp_path):
    shards = [_shard(tmp_path / f"s{i}.tar", [f"k{i}_{j}" for j in range(4)]) for i in range(3)]
    lines = summary_lines(None, None, 2, 2, 3, 128, {"train": shards})
    assert lines[0] == "world size 2; 12 samples per optimizer step (micro-batch 2 x grad_accum 3 x 2 ranks), " \
                       "at most 1536 tokens (max_length 128)"
    assert lines[1] == f"data.train: 3 shards ({shards[0]} .. {shards[-1]}), 12 samples"
