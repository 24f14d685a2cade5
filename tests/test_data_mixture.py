"""Weighted mixtures (taid_vlm/data/mixture.py): measured shares match the weights, the mixture is part of
the one global order (the same samples per step on every layout, resumable), a plain spec is unchanged."""

from collections import Counter
from pathlib import Path

import pytest

from data_helpers import text_spec, write_tar
from taid_vlm.data import build_loader
from taid_vlm.data.global_order import RawOrder
from taid_vlm.data.mixture import MixedOrder, largest_remainder
from test_data_index import _doc

REPO = Path(__file__).resolve().parents[1]


def test_largest_remainder_shares():
    assert largest_remainder([0.5, 0.3, 0.2], 1000) == [500, 300, 200]
    assert largest_remainder([1, 1, 1], 1000) == [334, 333, 333]
    assert sum(largest_remainder([0.013, 7, 2.5], 1000)) == 1000


def test_shares_over_ten_thousand_samples_are_within_one_percent_of_the_weights():
    weights = [0.6, 0.3, 0.1]
    sources = [(RawOrder(f"0:{k}", 100, [37 + 11 * k] * (3 + k)), 10 * k, w) for k, w in enumerate(weights)]
    order = MixedOrder(0, sources)
    seen = Counter(order.source_of(i)[0] for i in range(10_000))
    for k, w in enumerate(weights):
        assert abs(seen[k] / 10_000 - w) < 0.01, (k, seen)
    # each source walks its own order without gaps or repeats: its n-th use is its n-th sample
    per_source = {k: [n for i in range(3000) for kk, n in [order.source_of(i)] if kk == k] for k in range(3)}
    assert all(ns == list(range(len(ns))) for ns in per_source.values())


def _sources(tmp_path):
    a = [write_tar(tmp_path / f"a{s}.tar", [_doc(f"a{s}_{i}") for i in range(20)]) for s in range(3)]
    b = [write_tar(tmp_path / f"b{s}.tar", [_doc(f"b{s}_{i}") for i in range(7)]) for s in range(2)]
    return [{"shards": a, "weight": 3}, {"shards": b, "weight": 1}]


def _steps(spec, tok, world, accum, workers, steps, state=None):
    loaders = [build_loader(spec, text_spec(tok), mode="train", text_only=True, seed=5, rank=r, world_size=world,
                            grad_accum=accum, num_workers=workers, batch_size=2, shuffle_buffer=8, max_length=64)
               for r in range(world)]
    for ld in loaders:
        if state is not None:
            ld.load_state_dict(state)
    its = [iter(ld) for ld in loaders]
    keys = [[k for it in its for _ in range(accum) for k in next(it)["keys"]] for _ in range(steps)]
    for it in its:
        it.close()  # stops the DataLoader workers now (left to interpreter exit, they would hang it)
    return keys, loaders[0].state_dict()


def test_a_mixture_gives_the_same_samples_per_step_on_every_layout_and_resumes(tmp_path, tiny_tokenizer):
    spec = _sources(tmp_path)
    runs = [_steps(spec, tiny_tokenizer, *layout, 30)[0] for layout in [(1, 4, 0), (2, 2, 2), (4, 1, 1)]]
    assert runs[0] == runs[1] == runs[2]
    flat = [k for step in runs[0] for k in step]
    assert abs(sum(k.startswith("b") for k in flat) / len(flat) - 0.25) < 0.05  # 240 samples, weight 1 of 4
    first, state = _steps(spec, tiny_tokenizer, 2, 2, 0, 12)
    rest, _ = _steps(spec, tiny_tokenizer, 4, 1, 0, 18, state)  # resumed on another world size
    assert first + rest == runs[0]


def test_bad_sources_are_one_clear_error(tmp_path, tiny_tokenizer):
    good = _sources(tmp_path)[0]["shards"]
    with pytest.raises(ValueError, match="data source 1: needs 'shards'"):
        build_loader([{"shards": good}, {"path": good}], text_spec(tiny_tokenizer), text_only=True)
    with pytest.raises(ValueError, match="data source 0 .* weight must be > 0"):
        build_loader([{"shards": good, "weight": 0}], text_spec(tiny_tokenizer), text_only=True)
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="data source 1 .*empty.tar.* no readable sample"):
        build_loader([{"shards": good}, {"shards": str(tmp_path / "empty.tar")}], text_spec(tiny_tokenizer),
                     text_only=True)


def test_a_config_lists_weighted_sources_and_the_trainer_gets_them_expanded(tmp_path):
    """data.train as sources in a config: paths resolve against the config file, preflight expands each
    source once and keeps its weight, the loader mixes them; a bad source is one error naming it."""
    import yaml

    from taid_vlm.config import ConfigError, load_config
    from taid_vlm.train.preflight import all_shards, shard_lists

    sources = _sources(tmp_path)
    cfg_path = tmp_path / "run.yaml"
    base = yaml.safe_load((REPO / "configs" / "tiny_text.yaml").read_text())
    base["data"].update(train=[{"shards": "a{0..2}.tar", "weight": 3}, {"shards": ["b0.tar", "b1.tar"]}],
                        val=None, synthetic=None, synthetic_dir=None)
    base["output_dir"] = str(tmp_path / "out")
    for role in ("student", "teacher"):
        base[role]["model"] = str(REPO / "configs" / "models" / f"tiny_text_{role}.yaml")
    cfg_path.write_text(yaml.safe_dump(base))
    cfg = load_config(cfg_path)
    listed = shard_lists(cfg)["train"]
    assert [src["weight"] for src in listed] == [3.0, 1.0]
    assert listed[0]["shards"] == sources[0]["shards"] and listed[1]["shards"] == sources[1]["shards"]
    assert all_shards(listed) == sources[0]["shards"] + sources[1]["shards"]
    for bad, message in [("{shards: a0.tar, weight: 0}", r"data.train\[1\].weight: must be a number > 0, got 0"),
                         ("{shard: a0.tar}", r"data.train\[1\]: a source needs 'shards'")]:
        with pytest.raises(ConfigError, match=message):
            load_config(cfg_path, [f"data.train=[{{shards: a0.tar}}, {bad}]"])
