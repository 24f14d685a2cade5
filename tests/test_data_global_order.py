"""One global sample order: the same samples per optimizer step for any world size and worker count,
a position that resumes on another world size with no sample skipped or repeated, and no hang when
the data has no usable sample."""

import json

import pytest

from data_helpers import text_spec, write_tar
from taid_vlm.data import build_loader
from taid_vlm.data import NoUsableSampleError


def _doc(key: str, words: int = 3) -> dict:
    return {"__key__": key, "json": json.dumps({"text": "red circle " * words}).encode()}


def _shards(tmp_path, n_shards=3, per_shard=7, bad_every=0):
    paths = []
    for s in range(n_shards):
        docs = []
        for i in range(per_shard):
            key = f"s{s}_{i}"
            bad = bad_every and (s * per_shard + i) % bad_every == 0
            docs.append({"__key__": key, "json": b"{not json"} if bad else _doc(key, 1 + i % 3))
        paths.append(write_tar(tmp_path / f"{s}.tar", docs))
    return paths


def _loader(paths, tok, rank=0, world_size=1, grad_accum=1, num_workers=0, batch_size=2, **kw):
    kw.setdefault("shuffle_buffer", 7)  # 3 blocks per round of 3 x 7 samples
    kw.setdefault("max_length", 64)
    return build_loader(paths, text_spec(tok), text_spec(tok), mode="train", text_only=True, seed=7, rank=rank,
                        world_size=world_size, grad_accum=grad_accum, num_workers=num_workers,
                        batch_size=batch_size, **kw)


def _steps(loaders, grad_accum, n_steps):
    """Per optimizer step: the keys of every rank's micro-batches, rank-major (= global order), and the
    number of supervised tokens."""
    its = [iter(ld) for ld in loaders]
    out = []
    for _ in range(n_steps):
        keys, tokens = [], 0
        for it in its:
            for _ in range(grad_accum):
                batch = next(it)
                keys += batch["keys"]
                tokens += batch["student"]["loss_targets"].numel()
        out.append((keys, tokens))
    return out


LAYOUTS = [(1, 4, 0), (2, 2, 2), (4, 1, 1)]  # (world size, grad_accum, workers per rank)


@pytest.mark.parametrize("bad_every", [0, 4])
def test_every_world_size_sees_the_same_samples_per_step(tmp_path, tiny_tokenizer, bad_every):
    paths = _shards(tmp_path, bad_every=bad_every)
    results = []
    for world, ga, workers in LAYOUTS:
        loaders = [_loader(paths, tiny_tokenizer, r, world, ga, workers) for r in range(world)]
        results.append(_steps(loaders, ga, 7))
    assert results[0] == results[1] == results[2]
    keys = [k for step_keys, _ in results[0] for k in step_keys]
    per_step = 2 * 4
    if not bad_every:
        assert all(len(k) == per_step for k, _ in results[0])
        assert len(set(keys[:21])) == 21  # the first round: every sample of the 3 x 7 once, shuffled
        assert keys[:21] != sorted(keys[:21])
    else:  # unusable samples leave their slot empty, on every layout alike; nothing else moves
        assert all(len(k) <= per_step for k, _ in results[0]) and len(keys) < 7 * per_step


def test_a_micro_batch_of_only_bad_samples_still_runs_with_zero_tokens(tmp_path, tiny_tokenizer):
    paths = _shards(tmp_path, n_shards=2, per_shard=6, bad_every=2)  # every other sample unusable
    loader = _loader(paths, tiny_tokenizer, batch_size=1, shuffle_buffer=1)
    it = iter(loader)
    batches = [next(it) for _ in range(12)]
    empty = [b for b in batches if not b["keys"]]
    assert len(empty) == 6  # the bad_json slots
    for b in empty:  # a filler: a real row, no supervised token
        assert b["student"]["loss_targets"].numel() == 0 and b["student"]["input_ids"].shape[0] == 1
    assert sorted(k for b in batches for k in b["keys"]) == sorted(f"s{s}_{i}" for s in range(2) for i in (1, 3, 5))
    assert loader.skips.as_dict() == {"bad_json": 6}


@pytest.mark.parametrize("before,after", [((2, 2, 1), (1, 4, 0)), ((1, 4, 0), (2, 2, 2)), ((1, 2, 0), (2, 1, 1))])
def test_resume_on_another_world_size_skips_and_repeats_nothing(tmp_path, tiny_tokenizer, before, after):
    paths = _shards(tmp_path)
    (w1, ga1, nw1), (w2, ga2, nw2) = before, after
    assert w1 * ga1 == w2 * ga2  # the same samples per optimizer step
    reference = _steps([_loader(paths, tiny_tokenizer, r, w1, ga1, nw1) for r in range(w1)], ga1, 9)
    first = [_loader(paths, tiny_tokenizer, r, w1, ga1, nw1) for r in range(w1)]
    head = _steps(first, ga1, 4)
    state = json.loads(json.dumps(first[0].state_dict()))  # written once, by rank 0
    assert state["position"] == 4 * 2 * w1 * ga1 and state["micro"] == 0
    resumed = [_loader(paths, tiny_tokenizer, r, w2, ga2, nw2) for r in range(w2)]
    for ld in resumed:
        ld.load_state_dict(state)
    tail = _steps(resumed, ga2, 5)
    assert head + tail == reference
    keys = [k for step_keys, _ in head + tail for k in step_keys]
    assert len(keys) == 9 * 2 * w1 * ga1
    rounds, rest = divmod(len(keys), 21)  # every sample of the 3 x 7 once per round (blocks align with rounds)
    counts = {k: keys.count(k) for k in set(keys)}
    assert len(counts) == 21 and set(counts.values()) <= {rounds, rounds + 1}
    assert sum(c == rounds + 1 for c in counts.values()) == rest


def test_mid_step_state_resumes_exactly_on_the_same_layout_only(tmp_path, tiny_tokenizer):
    paths = _shards(tmp_path)
    full = iter(_loader(paths, tiny_tokenizer, grad_accum=3, num_workers=2))
    reference = [next(full)["keys"] for _ in range(8)]
    first = _loader(paths, tiny_tokenizer, grad_accum=3, num_workers=2)
    it = iter(first)
    head = [next(it)["keys"] for _ in range(4)]  # one step and one micro-batch into the next
    state = first.state_dict()
    assert state["micro"] == 1 and state["position"] == 6
    again = _loader(paths, tiny_tokenizer, grad_accum=3, num_workers=1)  # another worker count is fine
    again.load_state_dict(state)
    it = iter(again)
    assert head + [next(it)["keys"] for _ in range(4)] == reference
    with pytest.raises(ValueError, match="step boundary"):
        _loader(paths, tiny_tokenizer, grad_accum=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        build_loader(paths, text_spec(tiny_tokenizer), mode="train", text_only=True, seed=8, batch_size=2,
                     num_workers=0, shuffle_buffer=5).load_state_dict(state)


def _bad_sets(tmp_path, tok):
    corrupt = [write_tar(tmp_path / f"c{s}.tar", [{"__key__": f"c{s}_{i}", "json": b"{x"} for i in range(3)])
               for s in range(2)]
    long_chat = json.dumps({"messages": [{"role": "user", "content": "red circle " * 200},
                                         {"role": "assistant", "content": "blue"}]}).encode()
    long_docs = [write_tar(tmp_path / "long.tar", [{"__key__": f"l{i}", "json": long_chat} for i in range(3)])]
    empty = []
    for s in range(2):
        (tmp_path / f"e{s}.tar").write_bytes(b"")
        empty.append(str(tmp_path / f"e{s}.tar"))
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file at all" * 40)
    return {"bad_json": corrupt, "too_long": long_docs, "tar_error": empty + [str(garbage)]}


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2)])
def test_no_usable_sample_is_an_error_with_the_reasons_on_every_rank(tmp_path, tiny_tokenizer, world, workers):
    for reason, paths in _bad_sets(tmp_path, tiny_tokenizer).items():
        for rank in range(world):
            loader = _loader(paths, tiny_tokenizer, rank, world, num_workers=workers, max_length=32)
            with pytest.raises(NoUsableSampleError, match=f"no usable sample.*{reason}="):
                next(iter(loader))
            with pytest.raises(NoUsableSampleError, match=reason):
                loader.check_usable()


def test_broken_shards_among_good_ones_are_skipped_and_counted(tmp_path, tiny_tokenizer):
    bad = _bad_sets(tmp_path, tiny_tokenizer)["tar_error"]
    good = write_tar(tmp_path / "good.tar", [_doc(f"g{i}") for i in range(2)])
    paths = bad + [good]
    for world in (1, 2):
        loaders = [_loader(paths, tiny_tokenizer, r, world, batch_size=1, shuffle_buffer=1) for r in range(world)]
        steps = _steps(loaders, 1, 30)  # many rounds: runs of broken shards span round boundaries
        keys = [k for step_keys, _ in steps for k in step_keys]
        assert set(keys) == {"g0", "g1"} and len(keys) == 30 * world
        assert loaders[0].skips.as_dict()["tar_error"] >= 3
        loaders[0].check_usable()


def test_a_rank_whose_samples_are_all_bad_keeps_pace_with_zero_token_micro_batches(tmp_path, tiny_tokenizer):
    # 1 sample in 8 usable: with micro-batch 1, most micro-batches of each rank are fillers.
    paths = _shards(tmp_path, n_shards=2, per_shard=8, bad_every=1)
    good = write_tar(tmp_path / "g.tar", [_doc("only")])
    loaders = [_loader(paths + [good], tiny_tokenizer, r, 2, batch_size=1, num_workers=2) for r in range(2)]
    steps = _steps(loaders, 1, 40)
    keys = [k for step_keys, _ in steps for k in step_keys]
    assert set(keys) == {"only"} and 0 < len(keys) < 40
    assert all((tokens == 0) == (not k) for k, tokens in steps)


def test_val_check_at_setup(tmp_path, tiny_tokenizer):
    sets = _bad_sets(tmp_path, tiny_tokenizer)
    val = build_loader(sets["bad_json"], text_spec(tiny_tokenizer), mode="eval", text_only=True, num_workers=0)
    with pytest.raises(NoUsableSampleError, match=r"eval data: no usable sample in a full pass over 2 shard\(s\).*bad_json=6"):
        val.check_usable()
    ok = build_loader(sets["bad_json"] + _shards(tmp_path, n_shards=1), text_spec(tiny_tokenizer), mode="eval",
                      text_only=True, num_workers=0)
    ok.check_usable()
