"""Streaming: bad samples skipped and counted, exact eval split over ranks x workers, exact resume, packing."""

import json

import pytest
import torch

from data_helpers import caption_sample, conv_sample, jpg, student_spec, teacher_spec, text_spec, write_tar
from taid_vlm.data import build_loader


def _loader(shards, tok, **kw):
    kw.setdefault("max_length", 256)
    kw.setdefault("batch_size", 2)
    kw.setdefault("num_workers", 0)
    return build_loader(shards, student_spec(tok), teacher_spec(tok), **kw)


def test_bad_samples_are_skipped_and_counted(tmp_path, tiny_tokenizer):
    good = [caption_sample(f"g{i}", f"shape {i}") for i in range(4)]
    bad = [
        {"__key__": "corrupt", "jpg": jpg()[:60], "txt": b"cut jpeg"},
        {"__key__": "notimage", "jpg": b"not an image at all", "txt": b"x"},
        {"__key__": "badjson", "jpg": jpg(), "json": b"{not json"},
        {"__key__": "mismatch", **{k: v for k, v in conv_sample("x", 2).items() if k != "__key__"}, "2.jpg": jpg()},
        {"__key__": "notext", "jpg": jpg()},
        {"__key__": "noanswer", "json": json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()},
    ]
    a = write_tar(tmp_path / "a.tar", good[:2] + bad + good[2:])
    b = write_tar(tmp_path / "b.tar", [caption_sample(f"t{i}", f"shape {i}") for i in range(6)])
    import tarfile

    with tarfile.open(b) as tf:
        cut = next(m.offset_data for m in tf.getmembers() if m.name == "t3.jpg") + 100
    data = open(b, "rb").read()
    open(b, "wb").write(data[:cut])  # cut inside the 4th sample's jpg
    loader = _loader([a, b], tiny_tokenizer, mode="eval")
    keys = [k for batch in loader for k in batch["keys"]]
    assert keys == ["g0", "g1", "g2", "g3", "t0", "t1", "t2"]
    skips = loader.skips
    assert skips.as_dict() == {"bad_json": 1, "corrupt_image": 2, "marker_mismatch": 1, "missing_text": 2,
                               "truncated_tar": 1}
    assert set(skips.examples["corrupt_image"]) == {"corrupt", "notimage"}
    assert skips.examples["truncated_tar"] == [b]
    assert "bad_json=1" in skips.summary()
    assert loader.state_dict()["skips"]["counts"]["corrupt_image"] == 2


@pytest.mark.parametrize("n_shards", [5, 3])  # >= ranks x workers (shard split) and fewer (sample split)
def test_eval_two_ranks_two_workers_see_every_sample_once(tmp_path, tiny_tokenizer, n_shards):
    expected = []
    paths = []
    for s in range(n_shards):
        samples = [caption_sample(f"s{s}_{i}", f"number {i}") for i in range(s + 2)]  # uneven shards
        expected += [x["__key__"] for x in samples]
        paths.append(write_tar(tmp_path / f"{s}.tar", samples))
    seen = []
    for rank in range(2):
        loader = _loader(paths, tiny_tokenizer, mode="eval", num_workers=2, rank=rank, world_size=2)
        for _ in range(2):  # a second pass sees the same samples again
            keys = [k for batch in loader for k in batch["keys"]]
            assert loader.stats["samples"] == len(keys)
        seen += keys
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _sig(batch):
    return batch["keys"], batch["student"]["input_ids"].tolist(), batch["teacher"]["loss_positions"].tolist()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_resume_continues_with_next_unseen(tmp_path, tiny_tokenizer, num_workers):
    paths = [write_tar(tmp_path / f"{s}.tar", [caption_sample(f"s{s}_{i}", f"word {i % 3} " * (1 + i % 4))
                                               for i in range(5)]) for s in range(3)]
    kw = dict(mode="train", num_workers=num_workers, seed=3, shuffle_buffer=4, batch_size=3)
    full = [_sig(b) for b in _batches(_loader(paths, tiny_tokenizer, **kw), 9)]
    first = _loader(paths, tiny_tokenizer, **kw)
    head = [_sig(b) for b in _batches(first, 4)]
    sd = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    resumed = _loader(paths, tiny_tokenizer, **kw)
    resumed.load_state_dict(sd)
    tail = [_sig(b) for b in _batches(resumed, 5)]
    assert head + tail == full
    keys = [k for sig in full for k in sig[0]]
    assert len(set(keys)) == 15  # the stream really went around: shuffled, resampled rounds
    assert keys[:15] != sorted(keys[:15])
    other = _loader(paths, tiny_tokenizer, **{**kw, "seed": 4})
    assert [_sig(b) for b in _batches(other, 9)] != full
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(sd)


def test_eval_resume_mid_pass(tmp_path, tiny_tokenizer):
    paths = [write_tar(tmp_path / f"{s}.tar", [caption_sample(f"s{s}_{i}", "x") for i in range(5)]) for s in range(2)]
    loader = _loader(paths, tiny_tokenizer, mode="eval", batch_size=2)
    it = iter(loader)
    head = [k for _ in range(3) for k in next(it)["keys"]]
    resumed = _loader(paths, tiny_tokenizer, mode="eval", batch_size=2)
    resumed.load_state_dict(loader.state_dict())
    tail = [k for b in resumed for k in b["keys"]]
    assert head + tail == [f"s{s}_{i}" for s in range(2) for i in range(5)]
    assert [k for b in resumed for k in b["keys"]] == head + tail  # then full passes again


def test_text_only_padding_and_packing(tmp_path, tiny_tokenizer):
    docs = [{"__key__": f"d{i}", "json": json.dumps({"text": "red circle " * (i + 1)}).encode()} for i in range(6)]
    docs.append({"__key__": "chat", "json": json.dumps({"messages": [
        {"role": "user", "content": "color?"}, {"role": "assistant", "content": "blue"}]}).encode()})
    docs.append({"__key__": "img", "jpg": jpg(), "txt": b"caption"})  # an image sample in a text stream
    path = write_tar(tmp_path / "t.tar", docs)
    tok = tiny_tokenizer
    plain = build_loader(path, text_spec(tok), text_spec(tok), mode="eval", text_only=True, batch_size=3,
                         max_length=40, num_workers=0)
    batches = list(plain)
    assert [b["keys"] for b in batches] == [["d0", "d1", "d2"], ["d3", "d4", "d5"], ["chat"]]
    assert all(b["student"]["pixel_values"] is None and "position_ids" not in b["student"] for b in batches)
    assert plain.skips.as_dict() == {"images_in_text_only": 1}
    lens = [int(m.sum()) for b in batches for m in b["student"]["attention_mask"]]

    packed = build_loader(path, text_spec(tok), text_spec(tok), mode="eval", text_only=True, pack=True,
                          batch_size=2, max_length=40, num_workers=0)
    pb = list(packed)
    assert [k for b in pb for k in b["keys"]] == [f"d{i}" for i in range(6)] + ["chat"]
    n_loss = 0
    for b in pb:
        s = b["student"]
        assert s["input_ids"].shape[1] <= 40
        assert torch.equal(s["loss_targets"], b["teacher"]["loss_targets"])
        pos = s["position_ids"]
        for row in range(pos.shape[0]):
            n = int(s["attention_mask"][row].sum())
            starts = (pos[row, :n] == 0).nonzero().flatten().tolist()
            ends = starts[1:] + [n]
            for st, en in zip(starts, ends):
                assert pos[row, st:en].tolist() == list(range(en - st))
                assert s["labels"][row, st] == -100  # nothing predicts across a document boundary
        n_loss += s["loss_targets"].numel()
    assert sum(len(b["keys"]) for b in pb) == 7 and len(pb) < len(batches)
    n_plain = sum(b["student"]["loss_targets"].numel() for b in batches)
    assert n_loss == n_plain == sum(lens) - 7 - (len(tok.encode("<|im_start|>user\ncolor?<|im_end|>\n<|im_start|>assistant\n")))
