"""A block shuffle that mixes only a few shards is said once at start (rank 0, train), with the setting
that mixes them."""

from __future__ import annotations

import logging

import pytest
import webdataset as wds

from taid_vlm.data import build_loader
from taid_vlm.spec import InputSpec

LOGGER = "taid_vlm.data.factory"


@pytest.fixture(scope="module")
def ten_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("advice")
    for s in range(10):
        with wds.TarWriter(str(folder / f"d-{s:06d}.tar")) as w:
            for i in range(50):
                w.write({"__key__": f"s{s}_{i}", "txt": b"a doc"})
    return folder


def _warnings(caplog, shards, tiny_tokenizer, **kw):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        build_loader(shards, InputSpec(tiny_tokenizer), text_only=True, num_workers=0, **kw)
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_blocks_of_two_shards_are_warned_with_the_setting_that_mixes_them(ten_shards, caplog, tiny_tokenizer):
    spec = str(ten_shards / "d-{000000..000009}.tar")
    [msg] = _warnings(caplog, spec, tiny_tokenizer, shuffle_buffer=100)
    assert "shuffle_buffer 100 spans about 2.0 shard(s)" in msg and "(50 samples each, median)" in msg
    assert "data.shuffle_buffer=500 (10 shards' worth, or the whole set)" in msg  # 64 x 50 capped at the 500 there are


@pytest.mark.parametrize("kw", [dict(shuffle_buffer=400),  # 8 shards per block
                                dict(shuffle_buffer=250),  # half of the data
                                dict(shuffle_buffer=100, rank=1, world_size=2),  # said by rank 0 only
                                dict(shuffle_buffer=100, mode="eval")])
def test_no_warning_when_blocks_mix_enough_or_not_rank_0_or_not_training(ten_shards, caplog, tiny_tokenizer, kw):
    assert _warnings(caplog, str(ten_shards / "d-{000000..000009}.tar"), tiny_tokenizer, **kw) == []


def test_one_shard_has_nothing_to_mix(ten_shards, caplog, tiny_tokenizer):
    assert _warnings(caplog, str(ten_shards / "d-000000.tar"), tiny_tokenizer, shuffle_buffer=10) == []


def test_each_source_of_a_mixture_is_judged_on_its_own_shards(ten_shards, caplog, tiny_tokenizer):
    sources = [{"shards": str(ten_shards / "d-{000000..000004}.tar"), "weight": 1},
               {"shards": str(ten_shards / "d-{000005..000009}.tar"), "weight": 1}]
    msgs = _warnings(caplog, sources, tiny_tokenizer, shuffle_buffer=60)
    assert len(msgs) == 2 and "d-000005.tar" in msgs[1] and "data.shuffle_buffer=250" in msgs[1]
