"""The start-up summary counts samples as the loader reads them, from the shard index its loader loaded."""

from __future__ import annotations

import webdataset as wds

import taid_vlm.data.shard_index as shard_index
from taid_vlm.data import build_loader
from taid_vlm.spec import InputSpec
from taid_vlm.train.run_summary import summary_lines


def _shard(path, keys):
    with wds.TarWriter(str(path)) as w:
        for k in keys:
            w.write({"__key__": k, "txt": b"a doc"})
    return str(path)


def test_the_count_is_the_loaders_indexed_raw_samples_each_shard_walked_once(tmp_path, tiny_tokenizer, monkeypatch):
    walked = []
    build = shard_index.build_index
    monkeypatch.setattr(shard_index, "build_index", lambda path: walked.append(path) or build(path))
    a = _shard(tmp_path / "a.tar", ["s0", "s1", "s2"])
    b = _shard(tmp_path / "b.tar", ["t0", "t1"])
    loader = build_loader([a, b], InputSpec(tiny_tokenizer), text_only=True, num_workers=0)
    assert loader.raw_samples == 5
    line = summary_lines(None, None, 1, 2, 1, 64, {"train": [a, b]}, {"train": loader.raw_samples})[-1]
    assert line == f"data.train: 2 shards ({a} .. {b}), 5 samples" and walked == [a, b]  # no second walk
    (tmp_path / "b.tar").write_bytes((tmp_path / "b.tar").read_bytes())  # same bytes, new mtime: stale, re-walked
    assert build_loader([a, b], InputSpec(tiny_tokenizer), text_only=True, num_workers=0).raw_samples == 5
    assert walked == [a, b, b]


def test_a_set_without_a_count_is_unknown_not_an_error(tmp_path):
    line = summary_lines(None, None, 1, 2, 1, 64, {"train": ["http://127.0.0.1:9/none.tar"]}, {})[-1]
    assert line == "data.train: 1 shard (http://127.0.0.1:9/none.tar), sample count unknown"


def test_summary_names_the_shards_and_their_samples(tmp_path):
    shards = [_shard(tmp_path / f"s{i}.tar", [f"k{i}_{j}" for j in range(4)]) for i in range(3)]
    lines = summary_lines(None, None, 2, 2, 3, 128, {"train": shards}, {"train": 12})
    assert lines[0] == "world size 2; 12 samples per optimizer step (micro-batch 2 x grad_accum 3 x 2 ranks), " \
                       "at most 1536 tokens (max_length 128)"
    assert lines[1] == f"data.train: 3 shards ({shards[0]} .. {shards[-1]}), 12 samples"
