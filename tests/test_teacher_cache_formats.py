"""The cache formats beyond the uniform-tail top-k: the student-shaped tail (chunked path == its dense
formula) and the hidden-state cache (records round-trip; writer -> reader -> loss is the online loss
bit for bit when stored in the teacher's dtype), and an old top-k cache (no ``kind`` / ``tail`` in its
manifest) still loads."""

import json
import shutil

import numpy as np
import pytest
import torch

from taid_vlm.losses import LOSS_NAMES, OnlineTeacher, build_loss
from taid_vlm.losses.teacher_source import CachedTopKTeacher
from taid_vlm.teacher_cache import TeacherCache
from taid_vlm.teacher_cache import format as fmt
from taid_vlm.teacher_cache.source import cached_teacher
from taid_vlm.teacher_cache_writer import write_cache
from taid_vlm.train.objective import hidden_at
from taid_vlm.train.trainer import build_role_model
from test_teacher_cache_data import MAX_LEN, make_shards, run_config
from test_teacher_cache_loss import topk_of

from tests.loss_reference import N, V
from tests.loss_reference import lm_head_inputs as inputs


def student_tail_dense(zs, topk):
    """The student-shaped tail written out: top-k log-probs; elsewhere log_tail + log(q_v / q(tail))."""
    ids, lps, log_tail = topk["ids"].long(), topk["logprobs"].double(), topk["log_tail"].double()
    q = torch.softmax(zs.double(), -1)
    in_top = torch.zeros_like(q, dtype=torch.bool).scatter_(1, ids, True)
    q_tail = torch.where(in_top, 0.0, q).sum(-1, keepdim=True)
    out = log_tail[:, None] + torch.log(q) - torch.log(q_tail)
    return out.scatter(1, ids, lps)


@pytest.mark.parametrize("name", ["taid", "fkl", "rkl", "akl", "tvd"])
def test_student_tail_chunked_equals_its_dense_formula(name):
    hs, ws, ht, wt, mask, labels = inputs(seed=11)
    topk = topk_of(ht @ wt.T, 5)
    loss = build_loss(name).double()
    dense = student_tail_dense((hs @ ws.T).detach(), topk)
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(N, dtype=torch.float64), rtol=1e-12, atol=0)
    plain = loss(hs @ ws.T, dense, mask)
    g_plain = torch.autograd.grad(plain, [hs, ws])
    source = CachedTopKTeacher(topk["ids"], topk["logprobs"], topk["log_tail"], tail="student")
    cached = loss.fused(hs, ws, source, mask=mask, chunk_size=3)
    torch.testing.assert_close(cached, plain, rtol=1e-12, atol=1e-14)
    for a, b in zip(torch.autograd.grad(cached, [hs, ws]), g_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def _grads(value, tensors):
    return torch.autograd.grad(value, tensors)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_new_formats_at_full_fidelity_are_the_online_loss(name):
    """Every loss: the student-shaped tail at k = V (float64, 1e-10 like the uniform tail's test), and a
    float32 teacher's hidden states through the record format (float32) with its lm_head: bit for bit."""
    hs, ws, ht, wt, mask, labels = inputs(seed=12)
    loss = build_loss(name, **({"ce_weight": 0.3} if name != "ce" else {})).double()
    online = loss.fused(hs, ws, OnlineTeacher(ht, wt), mask, labels=labels, chunk_size=4)
    topk = topk_of(ht @ wt.T, V)
    source = CachedTopKTeacher(topk["ids"], topk["logprobs"], topk["log_tail"], tail="student")
    cached = loss.fused(hs, ws, source, mask=mask, labels=labels, chunk_size=4)
    torch.testing.assert_close(cached, online, rtol=1e-12, atol=1e-14)
    for a, b in zip(_grads(cached, [hs, ws]), _grads(online, [hs, ws])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)

    hs, ws, ht, wt, mask, labels = inputs(seed=13, dtype=torch.float32)
    loss = build_loss(name, **({"ce_weight": 0.3} if name != "ce" else {}))
    rec = fmt.decode(fmt.encode_hidden(np.zeros(N, np.int32), ht, "float32"))
    from_cache = cached_teacher({"hidden": fmt.hidden_tensor(rec.hidden, rec.dtype), "lm_head": _InMemoryLMHead(wt)})
    online = loss.fused(hs, ws, OnlineTeacher(ht, wt), mask, labels=labels, chunk_size=4)
    cached = loss.fused(hs, ws, from_cache, mask=mask, labels=labels, chunk_size=4)
    assert torch.equal(cached, online)
    for a, b in zip(_grads(cached, [hs, ws]), _grads(online, [hs, ws])):
        assert torch.equal(a, b)


class _InMemoryLMHead:
    """What reader.LMHead gives the loss side (``weight(device)``), without a file."""

    def __init__(self, weight):
        self._weight = weight

    def weight(self, device):
        return self._weight.to(device)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_hidden_record_round_trip(dtype):
    h = torch.randn(7, 24) * torch.arange(1, 8).unsqueeze(1)
    h[3] = 0.0  # an all-zero row: int8's scale must not divide by zero
    targets = np.arange(7, dtype=np.int32)
    data = fmt.encode_hidden(targets, h, dtype)
    assert len(data) == fmt.HEADER.size + 7 * fmt.hidden_bytes_per_token(24, dtype)
    rec = fmt.decode(data)
    assert isinstance(rec, fmt.HiddenRecord) and rec.dtype == dtype and rec.targets.tolist() == list(range(7))
    back = fmt.hidden_tensor(rec.hidden, dtype, rec.scale)
    if dtype == "int8":  # rounding to the nearest of 255 levels per token
        step = h.abs().amax(-1, keepdim=True) / 127
        assert back.dtype == torch.float32 and bool(((back - h).abs() <= 0.5 * step * (1 + 1e-6)).all())
        assert torch.equal(back[3], torch.zeros(24))
        sub = rec.select(np.array([1, 3]))
        assert torch.equal(fmt.hidden_tensor(sub.hidden, dtype, sub.scale), back[[1, 3]])
    else:
        assert torch.equal(back, h.to(getattr(torch, dtype)))
    with pytest.raises(fmt.CacheRecordError, match="header"):
        fmt.decode(data[:-2])


def test_a_gzipped_record_decodes_as_the_record_and_a_broken_one_is_a_record_error():
    """--compress records: each record gzipped alone; decode takes it by the gzip magic."""
    g = torch.Generator().manual_seed(0)
    n, k, v = 40, 64, 151_936  # a Zipf-like peaked teacher at Qwen2's vocabulary, as cache_bench's storage rows
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)]).int().numpy()
    logprobs = (-2.0 * np.log(np.arange(1, k + 1)) - 0.1 * np.random.default_rng(0).random((n, k))).astype(np.float32)
    record = fmt.encode(np.arange(n, dtype=np.int32), ids, logprobs, np.full(n, -5.0, np.float32))
    packed = fmt.compress_record(record)
    assert packed[:2] == fmt.GZIP_MAGIC and packed == fmt.compress_record(record)  # the same bytes each run
    assert len(packed) < 0.8 * len(record)  # the ids' high zero bytes and float16 exponents (measured ~0.7)
    a, b = fmt.decode(record), fmt.decode(packed)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.logprobs, b.logprobs) and np.array_equal(a.targets, b.targets)
    with pytest.raises(fmt.CacheRecordError, match="cannot be decompressed"):
        fmt.decode(packed[:-10])


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    paths = make_shards(root / "data")
    cfg = run_config(str(root / "data"))
    hidden = write_cache(cfg, root / "hidden", kind="hidden", splits=("train",))
    torch.manual_seed(cfg.seed)  # as the trainer and the writer build them (student first)
    student = build_role_model(cfg.student.model, "student")
    return {"root": root, "paths": paths, "cfg": cfg, "hidden": hidden,
            "teacher": build_role_model(cfg.teacher.model, "teacher").eval(), "student": student}


def _loader(c, cache=None, teacher=False):
    from taid_vlm.data import build_loader

    t_spec = c["teacher"].input_spec if teacher else None
    return build_loader(c["paths"], c["student"].input_spec, t_spec, companion=cache, mode="eval", batch_size=4,
                        max_length=MAX_LEN, num_workers=0, text_only=True)


def test_hidden_manifest(caches):
    m, h = caches["hidden"], caches["teacher"].output_weight().shape[1]
    assert m["kind"] == "hidden" and m["version"] == 2 and m["k"] is None
    assert m["hidden_size"] == h and m["hidden_dtype"] == "float32"
    assert m["bytes_per_token_payload"] == 4 + 4 * h
    assert m["lm_head"]["shape"] == [len(caches["student"].tokenizer), h]
    assert TeacherCache(caches["root"] / "hidden").k == len(caches["student"].tokenizer)


def test_hidden_cache_is_the_online_loss(caches):
    """Writer -> companion tar -> pipeline -> loss: stored in the teacher's dtype, the hidden-state cache
    recomputes the online teacher's logits with the same matmul, so the only difference left is the
    teacher forward's own float32 rounding on a differently padded batch (the writer batches samples in
    file order): ~1e-7 relative, where a k = 64 top-k cache of this teacher is off by tens of percent."""
    teacher, student = caches["teacher"], caches["student"]
    v = len(student.tokenizer)
    cache = TeacherCache(caches["root"] / "hidden")
    n = 0
    for b_on, b_ca in zip(_loader(caches, teacher=True), _loader(caches, cache), strict=True):
        assert b_on["keys"] == b_ca["keys"]
        with torch.no_grad():
            h_t, h_s0 = hidden_at(teacher, b_on["teacher"]), hidden_at(student, b_on["student"])
        sources = [{"teacher": OnlineTeacher(h_t, teacher.output_weight().detach()[:v])},
                   {"teacher": cached_teacher(b_ca["teacher_topk"])}]
        for name in ("taid", "rkl", "fkl"):
            results = []
            for kw in sources:
                h_s = h_s0.clone().requires_grad_()
                w_s = student.output_weight().detach()[:v].clone().requires_grad_()
                value = build_loss(name).fused(h_s, w_s, labels=b_on["student"]["loss_targets"], **kw)
                results.append((value, *torch.autograd.grad(value, [h_s, w_s])))
            for a, b in zip(*results):
                torch.testing.assert_close(b, a, rtol=2e-5, atol=1e-7)
        n += 1
    assert n > 0


@pytest.mark.slow
def test_int8_hidden_cache_is_within_a_percent_of_online(caches, record_property):
    """``--hidden-dtype int8`` (one scale per token, 8 + H bytes): the lossy variant, through the writer
    and the pipeline, against the online TAID loss on the tiny teacher."""
    folder = caches["root"] / "hidden_int8"
    if not (folder / "manifest.json").exists():
        write_cache(caches["cfg"], folder, kind="hidden", hidden_dtype="int8", splits=("train",))
    teacher, student = caches["teacher"], caches["student"]
    v = len(student.tokenizer)
    errors = []
    for b_on, b_ca in zip(_loader(caches, teacher=True), _loader(caches, TeacherCache(folder)), strict=True):
        with torch.no_grad():
            h_t, h_s = hidden_at(teacher, b_on["teacher"]), hidden_at(student, b_on["student"])
        w_s = student.output_weight().detach()[:v].clone().requires_grad_()
        res = []
        for kw in ({"teacher": OnlineTeacher(h_t, teacher.output_weight().detach()[:v])},
                   {"teacher": cached_teacher(b_ca["teacher_topk"])}):
            value = build_loss("taid").fused(h_s, w_s, labels=b_on["student"]["loss_targets"], **kw)
            res.append((float(value.detach()), torch.autograd.grad(value, [w_s])[0]))
        errors.append((abs(res[1][0] / res[0][0] - 1), float((res[1][1] - res[0][1]).norm() / res[0][1].norm())))
    worst = tuple(max(e[i] for e in errors) for i in range(2))
    print(f"\nint8 hidden cache vs online TAID: value {worst[0]:.2e}, gradient {worst[1]:.2e} (relative, worst batch)")
    record_property("int8_rel_value_error", worst[0])
    record_property("int8_rel_grad_error", worst[1])
    assert 0 < worst[1] < 1e-2 and worst[0] < 1e-2


def test_student_tail_cache_old_manifest_and_layout_guard(caches, tmp_path):
    """``--tail student`` reaches the loss's source; the same cache with its manifest stripped of ``kind``
    and ``tail`` (a cache written before the formats existed, version 1) loads as a uniform-tail top-k;
    an unfinished cache resumed with another layout is refused."""
    folder = tmp_path / "st"
    m = write_cache(caches["cfg"], folder, k=8, splits=("train",), tail="student")
    assert m["tail"] == "student" and m["kind"] == "topk" and m["version"] == 1
    batch = next(iter(_loader(caches, TeacherCache(folder))))
    assert cached_teacher(batch["teacher_topk"]).tail == "student"
    for key in ("kind", "tail"):
        m.pop(key)
    (folder / "manifest.json").write_text(json.dumps(m))
    cache = TeacherCache(folder)
    assert cache.kind == "topk" and cache.tail == "uniform" and cache.k == 8
    source = cached_teacher(next(iter(_loader(caches, cache)))["teacher_topk"])
    assert isinstance(source, CachedTopKTeacher) and source.tail == "uniform" and source.ids.shape[1] == 8
    shutil.rmtree(folder / "train")
    with pytest.raises(ValueError, match="--overwrite"):
        write_cache(caches["cfg"], folder, kind="hidden", splits=("train",))
