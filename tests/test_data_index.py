"""The shard index and reads by byte range: the global order read through the index is, key for key, the
order a walk of the whole raw stream gives (webdataset's own tar iterator + group_by_keys), on a shard
set with corrupt members, duplicate names, meta members, an empty file, a non-tar and a cut tar; the
index agrees with the tar; stale and missing indexes are handled as docs/data_at_scale.md says."""

import io
import json
import os
import tarfile
from collections import Counter

import pytest
from webdataset.tariterators import group_by_keys, tar_file_iterator

from data_helpers import text_spec, write_tar
from taid_vlm.data import build_loader
from taid_vlm.data.global_order import block_permutation, shard_round_order
from taid_vlm.data.shard_index import SUMMARY_NAME, StaleIndexError, build_index, load_indexes
from taid_vlm.data.shard_io import read_range, read_shard
from taid_vlm.data.skips import SkipCounter


def _doc(key, words=2):
    return {"__key__": key, "json": json.dumps({"text": "red circle " * words}).encode()}


def _tar_by_hand(path, members):
    """A tar with exactly these (name, bytes) members (directories for a None payload)."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return str(path)


def _odd_shards(tmp_path):
    """Good shards, bad samples, and every kind of broken tar the walk must count alike."""
    paths = [write_tar(tmp_path / f"good{s}.tar", [_doc(f"g{s}_{i}", 1 + i % 3) for i in range(9)]) for s in range(3)]
    paths.append(write_tar(tmp_path / "badjson.tar", [_doc("b0"), {"__key__": "bad_1", "json": b"{x"}, _doc("b2")]))
    doc = json.dumps({"text": "red circle"}).encode()
    paths.append(_tar_by_hand(tmp_path / "odd.tar", [
        ("o0.json", doc), ("dir", None), ("__meta__", b"x"), ("o1.json", doc), ("o1.json", doc),  # a duplicate
        ("noext", b"y"), ("o2.json", doc)]))
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "garbage.tar").write_bytes(b"not a tar file " * 50)
    paths += [str(tmp_path / "empty.tar"), str(tmp_path / "garbage.tar")]
    cut = write_tar(tmp_path / "cut.tar", [_doc(f"c{i}", 30) for i in range(6)])
    with tarfile.open(cut) as tf:
        at = next(m.offset_data for m in tf.getmembers() if m.name == "c4.json") + 100
    data = open(cut, "rb").read()
    open(cut, "wb").write(data[:at])
    return paths + [cut]


def _walked_keys(path):
    """Raw sample keys of a whole shard, by webdataset's own iterators (errors skipped)."""
    def files():
        try:
            with open(path, "rb") as f:
                yield from tar_file_iterator(f, handler=lambda e: True)
        except (tarfile.TarError, OSError, EOFError):
            return

    return [s["__key__"] for s in group_by_keys(({**f, "__url__": path} for f in files()), handler=lambda e: True)]


def _reference_order(paths, seed, K, n):
    """The first ``n`` keys of the global order, by walking the concatenated rounds and shuffling blocks."""
    per_shard = [_walked_keys(p) for p in paths]
    stream, r = [], 0
    while len(stream) < n + K:
        stream += [k for s in shard_round_order(seed, r, len(paths)) for k in per_shard[s]]
        r += 1
    out = []
    for b in range((n + K - 1) // K):
        perm = block_permutation(seed, b, K)
        out += [stream[b * K + perm[p]] for p in range(K)]
    return out[:n]


def _keys_per_step(paths, tok, world, accum, workers, steps, batch=2, K=5, **kw):
    loaders = [build_loader(paths, text_spec(tok), text_spec(tok), mode="train", text_only=True, seed=3, rank=r,
                            world_size=world, grad_accum=accum, num_workers=workers, batch_size=batch,
                            shuffle_buffer=K, max_length=64, **kw) for r in range(world)]
    its = [iter(ld) for ld in loaders]
    out = []
    for _ in range(steps):
        keys = []
        for it in its:
            for _ in range(accum):
                keys += next(it)["keys"]
        out.append(keys)
    for it in its:
        it.close()  # stops the DataLoader workers now (left to interpreter exit, they would hang it)
    return out, loaders


def test_the_indexed_order_is_the_walked_order_on_every_layout(tmp_path, tiny_tokenizer):
    paths = _odd_shards(tmp_path)
    steps, per_step = 12, 2 * 4
    ref = _reference_order(paths, seed=3, K=5, n=steps * per_step)
    expected = [[k for k in ref[t * per_step:(t + 1) * per_step] if not k.startswith("bad")] for t in range(steps)]
    assert sum(k.startswith("bad") for k in ref) > 0  # the set does hit an unusable sample in these steps
    for world, accum, workers in [(1, 4, 0), (2, 2, 2), (4, 1, 1)]:
        got, loaders = _keys_per_step(paths, tiny_tokenizer, world, accum, workers, steps)
        assert got == expected, (world, accum, workers)
        bad_json = sum(ld.skips.as_dict().get("bad_json", 0) for ld in loaders)
        assert bad_json == sum(k.startswith("bad") for k in ref)  # rank sums: each unusable sample counted once


def test_read_errors_are_counted_once_per_pass_by_rank_zero(tmp_path, tiny_tokenizer):
    paths = _odd_shards(tmp_path)
    per_round = sum(len(_walked_keys(p)) for p in paths)
    steps = per_round // 8 * 3  # about three rounds
    counts = []
    for world, accum, workers in [(1, 4, 0), (2, 2, 2)]:
        _, loaders = _keys_per_step(paths, tiny_tokenizer, world, accum, workers, steps, K=per_round)
        counts.append([Counter(ld.skips.as_dict()) for ld in loaders])
    for by_rank in counts:
        # per round: the empty file, the non-tar and the duplicate member name (webdataset raises on it)
        assert by_rank[0]["tar_error"] % 3 == 0 and by_rank[0]["tar_error"] >= 6
        assert by_rank[0]["truncated_tar"] >= 2
        assert all(c["tar_error"] == 0 and c["truncated_tar"] == 0 for c in by_rank[1:])
    assert counts[0][0]["tar_error"] == counts[1][0]["tar_error"]
    assert counts[0][0]["truncated_tar"] == counts[1][0]["truncated_tar"]


def test_the_index_agrees_with_the_tar(tmp_path):
    for path in _odd_shards(tmp_path):
        ix = build_index(path)
        skips = SkipCounter()
        walked = list(read_shard(path, skips))
        assert ix.samples == len(walked) == len(_walked_keys(path))
        assert sorted(r for r, _ in ix.errors) == sorted(skips.as_dict())
        with open(path, "rb") as f:
            for (start, end), sample in zip(ix.spans, walked):
                assert read_range(f, path, start, end) == sample
    cut = build_index(str(tmp_path / "cut.tar"))
    assert cut.samples == 4 and cut.errors == [("truncated_tar", 3)]  # met while the 4th sample was still open


def test_startup_indexes_stale_shards_and_reads_one_summary(tmp_path, tiny_tokenizer, caplog):
    paths = [write_tar(tmp_path / f"s{s}.tar", [_doc(f"s{s}_{i}") for i in range(4)]) for s in range(3)]
    load_indexes(paths)
    summary = json.loads((tmp_path / SUMMARY_NAME).read_text())["shards"]
    assert {k: v["samples"] for k, v in summary.items()} == {"s0.tar": 4, "s1.tar": 4, "s2.tar": 4}
    loader = build_loader(paths, text_spec(tiny_tokenizer), mode="eval", text_only=True, num_workers=0, batch_size=4)
    assert all(ix.spans is None for ix in loader.stream.indexes)  # from the summary: ranges come from the sidecars
    assert [k for b in loader for k in b["keys"]] == [f"s{s}_{i}" for s in range(3) for i in range(4)]
    for p in paths:
        os.remove(p + ".idx")  # start-up needs the summary only
    caplog.clear()
    assert [ix.samples for ix in load_indexes(paths)] == [4, 4, 4] and "indexing" not in caplog.text
    with pytest.raises(StaleIndexError, match=r"s0.tar is in shards.index.json but its index .*index_shards"):
        list(build_loader(paths, text_spec(tiny_tokenizer), mode="eval", text_only=True, num_workers=0))
    write_tar(tmp_path / "s1.tar", [_doc(f"new_{i}") for i in range(6)])  # the shard changed: re-indexed, said
    os.utime(paths[1], ns=(1, 1))
    assert [ix.samples for ix in load_indexes(paths)] == [4, 6, 4]
    assert "indexing 1 shard(s)" in caplog.text and "s1.tar" in caplog.text


def test_a_remote_shard_needs_its_index_next_to_it(tmp_path):
    url = f"pipe:cat {tmp_path}/x-000000.tar"
    with pytest.raises(StaleIndexError, match=r"remote shard pipe:cat .*x-000000.tar has no index.*index_shards"):
        load_indexes([url])


def test_index_shards_tool_writes_verifies_and_names_a_mismatch(tmp_path, capsys):
    from data_tools.index_shards import main

    paths = _odd_shards(tmp_path)
    assert main([str(tmp_path)]) == 0
    assert f"indexed {len(paths)} shard(s), 37 samples, 4 read error(s)" in capsys.readouterr().out
    assert main([str(tmp_path), "--verify"]) == 0
    side = json.loads(open(paths[0] + ".idx").read())
    side["ends"][3] += 512  # an index that no longer describes its tar
    open(paths[0] + ".idx", "w").write(json.dumps(side))
    assert main([str(tmp_path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert f"MISMATCH {paths[0]}: index differs in ends" in out and "1 mismatch(es)" in out
    assert main(["pipe:cat /nonexistent-x.tar"]) == 2
    assert "error: " in capsys.readouterr().err
