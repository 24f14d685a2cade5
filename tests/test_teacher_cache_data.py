"""Teacher cache end to end at the data level: the writer, exactness at k = V through the stored format,
alignment of cached rows with samples under shuffling / 2 workers / resume, and integrity failures
(manifest mismatch, truncated companion, missing key, changed data shard, skip records)."""

import gzip
import io
import json
import shutil
import tarfile

import pytest
import torch

from data_helpers import write_tar
from taid_vlm.config import ConfigError, load_config
from taid_vlm.data import build_loader
from taid_vlm.losses import CachedTopKTeacher, OnlineTeacher, build_loss
from taid_vlm.teacher_cache import CacheMismatchError, TeacherCache, check_manifest, decode
from taid_vlm.teacher_cache_writer import write_cache
from taid_vlm.train.objective import hidden_at
from taid_vlm.train.trainer import build_role_model, open_teacher_cache
from train_helpers import CONFIGS

COLORS = ["red", "blue", "green", "yellow", "purple"]
MAX_LEN = 64


def chat(key, i):
    answer = " ".join(COLORS[(i + j) % 5] for j in range(1 + i % 4))
    msgs = [{"role": "user", "content": f"Which colors in scene {i}?"}, {"role": "assistant", "content": answer}]
    return {"__key__": key, "json": json.dumps({"messages": msgs}).encode()}


def make_shards(folder, n_shards=3, per_shard=6, bad=False):
    paths = []
    for s in range(n_shards):
        samples = [chat(f"s{s}_{i:02d}", s * per_shard + i) for i in range(per_shard)]
        if bad and s == 0:
            samples.insert(2, {"__key__": "s0_bad", "json": b"{not json"})
        paths.append(write_tar(folder / f"shard-{s:06d}.tar", samples))
    return paths


def run_config(train, **data):
    return load_config(data={
        "teacher": {"model": str(CONFIGS / "models/tiny_text_teacher.yaml")},
        "student": {"model": str(CONFIGS / "models/tiny_text_student.yaml")},
        "data": {"train": train, "text_only": True, "max_length": MAX_LEN, **data},
        "loss": {"name": "taid"}, "train": {"micro_batch_size": 4}})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    paths = make_shards(root / "data", bad=True)
    cfg = run_config(str(root / "data"))
    manifest = write_cache(cfg, root / "topk8", k=8, splits=("train",))
    write_cache(cfg, root / "topk8_plain", k=8, splits=("train",), compress=False)
    write_cache(cfg, root / "topk8_records", k=8, splits=("train",), compress="records")
    torch.manual_seed(cfg.seed)  # as the trainer builds them (student first): the writer's teacher too
    student = build_role_model(cfg.student.model, "student")
    teacher = build_role_model(cfg.teacher.model, "teacher").eval()
    return {"root": root, "paths": paths, "cfg": cfg, "manifest": manifest, "teacher": teacher, "student": student}


def loader(setup, cache=None, teacher=False, **kw):
    kw = {"mode": "eval", "batch_size": 4, "max_length": MAX_LEN, "num_workers": 0, "text_only": True, **kw}
    t_spec = setup["teacher"].input_spec if teacher else None
    return build_loader(setup["paths"], setup["student"].input_spec, t_spec, companion=cache, **kw)


def records_by_key(folder):
    """Every companion record of a cache, decoded, by key (read independently of the pipeline)."""
    out = {}
    for path in sorted(folder.rglob("*.tar")):
        with tarfile.open(path, "r:*") as tf:
            for m in tf.getmembers():
                key, field = m.name.split(".", 1)
                if field == "topk":
                    out[key] = decode(tf.extractfile(m).read())
    return out


def test_the_writer_caches_the_teacher_the_trainer_builds(setup):
    """A teacher built from a config has random weights: the writer draws them as the trainer does."""
    from taid_vlm.teacher_cache.manifest import weights_fingerprint

    assert setup["manifest"]["teacher"]["weights_fingerprint"] == weights_fingerprint(setup["teacher"])


def test_manifest_and_storage(setup):
    m = setup["manifest"]
    assert m["k"] == 8 and m["vocab_size"] == len(setup["student"].tokenizer) and m["compression"] == "gzip"
    assert [s["companion"] for s in m["shards"]] == [f"train/shard-{s:06d}.tar" for s in range(3)]
    t = m["totals"]
    assert t["samples"] == 19 and t["cached"] == 18 and t["skipped"] == {"bad_json": 1}
    assert t["payload_bytes_per_supervised_token"] == pytest.approx(6 * 8 + 8, abs=16 * 19 / t["supervised_tokens"] + 1e-9)
    assert set(m["rendering"]) >= {"max_length", "chat_template", "caption_instruction", "text_only", "tokens_per_image"}
    assert m["teacher"]["weights_fingerprint"].startswith("sha256:")


def _online_and_cached_losses(setup, cache, name="taid"):
    """Per batch: (online loss, cached loss, online grads, cached grads) on identical eval batches."""
    teacher, student = setup["teacher"], setup["student"]
    v = len(student.tokenizer)
    out = []
    for b_on, b_ca in zip(loader(setup, teacher=True), loader(setup, cache=cache), strict=True):
        assert b_on["keys"] == b_ca["keys"]
        assert torch.equal(b_on["student"]["loss_targets"], b_ca["student"]["loss_targets"])
        with torch.no_grad():
            h_t = hidden_at(teacher, b_on["teacher"])
            h_s0 = hidden_at(student, b_on["student"])
        w_t = teacher.output_weight().detach()[:v]
        loss = build_loss(name)
        res = []
        for kw in ({"teacher": OnlineTeacher(h_t, w_t)},
                   {"teacher": CachedTopKTeacher.from_batch(name, b_ca["teacher_topk"])}):
            h_s = h_s0.clone().requires_grad_()
            w_s = student.output_weight().detach()[:v].clone().requires_grad_()
            value = loss.fused(h_s, w_s, labels=b_on["student"]["loss_targets"], **kw)
            res.append((value.detach(), torch.autograd.grad(value, [h_s, w_s])))
        out.append(res)
    return out


@pytest.mark.parametrize("name", ["taid", "fkl", "rkl"])
def test_k_equals_vocab_float32_cache_is_the_online_loss(setup, name):
    """Through the writer, the stored format and the pipeline: k = V with float32 log-probs gives the
    online loss and gradients (up to float32 rounding of log_softmax(log_softmax(z)) vs log_softmax(z))."""
    folder = setup["root"] / "topkV32"
    if not (folder / "manifest.json").exists():
        write_cache(setup["cfg"], folder, k=len(setup["student"].tokenizer), splits=("train",), logprob_dtype="float32")
    for (v_on, g_on), (v_ca, g_ca) in _online_and_cached_losses(setup, TeacherCache(folder), name):
        torch.testing.assert_close(v_ca, v_on, rtol=1e-5, atol=1e-6)
        for a, b in zip(g_ca, g_on):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_k64_and_16bit_error_vs_online_reported(setup, record_property):
    """The stored default (float16) at k = V and k = 64 of V = 512, against the online TAID loss on the
    tiny random teacher (whose distributions are flat: a hard case for a top-k cache)."""
    v = len(setup["student"].tokenizer)
    for k in (v, 64):
        folder = setup["root"] / f"topk{k}"
        if not (folder / "manifest.json").exists():
            write_cache(setup["cfg"], folder, k=k, splits=("train",))
        pairs = _online_and_cached_losses(setup, TeacherCache(folder))
        on = torch.stack([p[0][0] for p in pairs])
        ca = torch.stack([p[1][0] for p in pairs])
        rel = float(((ca - on).abs() / on).max())
        grad = max(float((a - b).norm() / b.norm()) for p in pairs for a, b in zip(p[1][1], p[0][1]))
        mass = float(decode_rows(folder).mean())
        print(f"\ntiny teacher, k={k} of V={v} (top-k mass {mass:.3f}): max rel loss error {rel:.2e}, "
              f"max rel gradient error {grad:.2e}")
        record_property(f"k{k}_rel_loss_error", rel)
        record_property(f"k{k}_rel_grad_error", grad)
        if k == v:  # only the float16 rounding of the log-probs
            assert rel < 1e-3 and grad < 1e-2
        else:  # flat random teacher: the top-64 hold ~18 % of the mass; the number is the point here
            assert rel == rel and grad == grad


def decode_rows(folder):
    return torch.cat([torch.from_numpy(r.logprobs.astype("float64")).exp().sum(-1)
                      for r in records_by_key(folder).values()])


def _sig(batch):
    t = batch["teacher_topk"]
    return batch["keys"], t["ids"].tolist(), t["logprobs"].float().tolist(), t["log_tail"].tolist()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_rows_follow_their_samples_under_shuffle_workers_and_resume(setup, num_workers):
    cache = TeacherCache(setup["root"] / "topk8")
    recs = records_by_key(setup["root"] / "topk8")
    kw = dict(mode="train", num_workers=num_workers, seed=3, shuffle_buffer=4, batch_size=3)
    it = iter(loader(setup, cache=cache, **kw))
    full = [next(it) for _ in range(10)]
    keys = [k for b in full for k in b["keys"]]
    assert keys[:18] != sorted(keys[:18]) and "s0_bad" not in keys
    for b in full:
        want = [recs[k] for k in b["keys"]]
        assert torch.equal(b["teacher_topk"]["ids"], torch.cat([torch.from_numpy(r.ids.copy()) for r in want]))
        assert torch.equal(b["teacher_topk"]["log_tail"], torch.cat([torch.from_numpy(r.log_tail.copy()) for r in want]))
        assert torch.equal(b["student"]["loss_targets"], torch.cat([torch.from_numpy(r.targets.copy()).long() for r in want]))
    first = loader(setup, cache=cache, **kw)
    it = iter(first)
    head = [_sig(next(it)) for _ in range(4)]
    sd = json.loads(json.dumps(first.state_dict()))
    resumed = loader(setup, cache=cache, **kw)
    resumed.load_state_dict(sd)
    it = iter(resumed)
    tail = [_sig(next(it)) for _ in range(6)]
    assert head + tail == [_sig(b) for b in full]
    ev = loader(setup, cache=cache)
    assert len([k for b in ev for k in b["keys"]]) == 18
    assert ev.skips.as_dict() == {"bad_json": 1}  # the writer's skip record, replayed under its reason


def test_packed_batches_carry_rows_in_loss_target_order(setup):
    cache = TeacherCache(setup["root"] / "topk8")
    recs = records_by_key(setup["root"] / "topk8")
    for b in loader(setup, cache=cache, pack=True, batch_size=2):
        want = torch.cat([torch.from_numpy(recs[k].targets.copy()).long() for k in b["keys"]])
        assert torch.equal(b["student"]["loss_targets"], want)


def test_manifest_mismatch_names_the_field(setup):
    folder = str(setup["root"] / "topk8")
    student = setup["student"]
    cfg = run_config(str(setup["root"] / "data"), max_length=32)
    cfg.teacher.cache = folder
    with pytest.raises(ConfigError, match=r"rendering\.max_length is 64 but this run has data\.max_length = 32"):
        open_teacher_cache(cfg, student)
    cfg = run_config(str(setup["root"] / "data"), caption_instruction="Say what you see.")
    cfg.teacher.cache = folder
    with pytest.raises(ConfigError, match=r"rendering\.caption_instruction"):
        open_teacher_cache(cfg, student)
    cfg = run_config(str(setup["root"] / "data"))
    cfg.teacher.cache = folder
    cfg.teacher.model = {**cfg.teacher.model, "dtype": "bfloat16"}
    with pytest.raises(ConfigError, match=r"teacher\.config .* teacher\.model"):
        open_teacher_cache(cfg, student)
    cfg.teacher.model = None  # the cache alone: fine
    assert open_teacher_cache(cfg, student).k == 8
    m = TeacherCache(folder).manifest
    with pytest.raises(CacheMismatchError, match=r"tokenizer\.vocab_hash"):
        check_manifest(m, folder, vocab="sha256:other", vocab_size=512, max_length=MAX_LEN, text_only=True,
                       caption_instruction=m["rendering"]["caption_instruction"])
    with pytest.raises(ConfigError, match="teacher.cache: .* has no manifest.json"):
        load_config(data={"student": {"model": str(CONFIGS / "models/tiny_text_student.yaml")},
                          "teacher": {"cache": str(setup["root"])}, "data": {"train": "x"}})
    bad = setup["root"] / "edited"
    shutil.copytree(folder, bad)
    edited = json.loads((bad / "manifest.json").read_text())
    edited["rendering"]["max_length"] = 999
    (bad / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(CacheMismatchError, match="rendering_hash"):
        TeacherCache(bad)


def _copy_cache(setup, name):
    dst = setup["root"] / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(setup["root"] / "topk8", dst)
    return dst


def test_truncated_companion_is_a_counted_skip(setup):
    folder = _copy_cache(setup, "cut")
    comp = folder / "train" / "shard-000001.tar"
    data = comp.read_bytes()
    comp.write_bytes(data[: len(data) // 2])
    ld = loader(setup, cache=TeacherCache(folder))
    keys = [k for b in ld for k in b["keys"]]
    skips = ld.skips.as_dict()
    lost = 6 - sum(k.startswith("s1_") for k in keys)
    assert 0 < lost < 6 and skips["teacher_cache_missing"] == lost and skips["truncated_tar"] == 1
    assert [k for k in keys if not k.startswith("s1_")] == [f"s{s}_{i:02d}" for s in (0, 2) for i in range(6)]


@pytest.mark.parametrize("name", ["topk8_plain", "topk8_records"])
def test_plain_tar_companions_are_read_by_byte_range_and_give_the_gzip_rows(setup, monkeypatch, name):
    """cache_teacher --compress none / records: each companion indexed as it is written, its records then
    read by range (never whole), the same rows in the same batches as the gzip cache, under shuffle and
    resume; records: each record gzipped alone (its size: test_teacher_cache_formats.py)."""
    import taid_vlm.data.sample_reader as sample_reader

    plain, gz = TeacherCache(setup["root"] / name), TeacherCache(setup["root"] / "topk8")
    assert sorted(p.name for p in (setup["root"] / name / "train").glob("*.tar.idx")) == \
        [f"shard-{s:06d}.tar.idx" for s in range(3)]
    assert plain.manifest["compression"] == {"topk8_plain": None, "topk8_records": "gzip-records"}[name]
    with tarfile.open(setup["root"] / name / "train" / "shard-000000.tar") as tf:  # a plain tar either way
        record = next(tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".topk"))
    assert record[:2] == (b"\x1f\x8b" if name == "topk8_records" else b"TK")
    kw = dict(mode="train", num_workers=0, seed=3, shuffle_buffer=4, batch_size=3)
    it = iter(loader(setup, cache=gz, **kw))
    want = [_sig(next(it)) for _ in range(10)]

    def whole_read(*a, **k):
        raise AssertionError("a plain companion was read whole")

    monkeypatch.setattr(sample_reader, "read_shard", whole_read)
    first = loader(setup, cache=plain, **kw)
    it = iter(first)
    head = [_sig(next(it)) for _ in range(4)]
    resumed = loader(setup, cache=plain, **kw)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    it = iter(resumed)
    assert head + [_sig(next(it)) for _ in range(6)] == want
    ev = loader(setup, cache=plain)
    assert len([k for b in ev for k in b["keys"]]) == 18 and ev.skips.as_dict() == {"bad_json": 1}


def test_gzip_companions_over_many_shards_per_block_are_warned_plain_ones_are_not(setup, caplog, monkeypatch):
    import logging

    import taid_vlm.data.factory as factory

    def said(name, K):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="taid_vlm.data.factory"):
            loader(setup, cache=TeacherCache(setup["root"] / name), mode="train", shuffle_buffer=K)
        return [r.getMessage() for r in caplog.records if "companions are gzip" in r.getMessage()]

    assert said("topk8", 30) == []  # a block over all 3 shards: not more than the 4 a worker keeps
    monkeypatch.setattr(factory, "GZIP_COMPANIONS_KEPT", 2)  # as with 3 of 4 + 1 shards per block
    assert said("topk8", 6) == [] and said("topk8_plain", 30) == []  # a block within one shard; plain: by range
    [msg] = said("topk8", 30)
    assert "--compress records" in msg and "shard-000000.tar" in msg and "last 2" in msg


def test_truncated_plain_companion_is_a_counted_skip_too(setup, caplog):
    folder = setup["root"] / "cut_plain"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(setup["root"] / "topk8_plain", folder)
    comp = folder / "train" / "shard-000001.tar"
    data = comp.read_bytes()
    comp.write_bytes(data[: len(data) // 2 + 600])  # inside a member's data; its index is stale: re-indexed at start
    ld = loader(setup, cache=TeacherCache(folder))
    keys = [k for b in ld for k in b["keys"]]
    skips = ld.skips.as_dict()
    lost = 6 - sum(k.startswith("s1_") for k in keys)
    assert 0 < lost < 6 and skips["teacher_cache_missing"] == lost and skips["truncated_tar"] == 1
    assert "indexing 1 shard(s)" in caplog.text and str(comp) in caplog.text


def test_missing_key_is_an_error_and_a_changed_shard_stops_at_startup(setup):
    folder = _copy_cache(setup, "gap")
    comp = folder / "train" / "shard-000002.tar"
    with tarfile.open(comp, "r:*") as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for m, payload in members:
            if not m.name.startswith("s2_03."):
                out.addfile(m, io.BytesIO(payload))
    comp.write_bytes(gzip.compress(buf.getvalue()))
    with pytest.raises(RuntimeError, match=r"misaligned .* key 's2_04' there and 's2_03' here"):
        list(loader(setup, cache=TeacherCache(folder)))
    moved = setup["root"] / "moved" / "data"  # a moved data folder still finds its companions by name
    shutil.copytree(setup["root"] / "data", moved, dirs_exist_ok=True)
    cache = TeacherCache(setup["root"] / "topk8")
    spec = setup["student"].input_spec
    assert len(list(build_loader(str(moved), spec, None, text_only=True, companion=cache, mode="eval"))) > 0
    with open(moved / "shard-000000.tar", "ab") as f:
        f.write(b"\0" * 1024)
    with pytest.raises(CacheMismatchError, match="shard changed"):
        build_loader(str(moved), spec, None, text_only=True, companion=cache)
    other = write_tar(setup["root"] / "other" / "extra-000000.tar", [chat("x0", 0)])
    with pytest.raises(CacheMismatchError, match="has no companion"):
        build_loader(other, spec, None, text_only=True, companion=cache)
