"""How far a cached teacher's loss and gradient are from the online teacher's, per cache format and loss,
at Qwen2's vocabulary size (V = 151,936). Used by benchmarks/cache_bench.py (the table in
docs/benchmarks.md); runs alone too:

    PYTHONPATH=$PWD .venv/bin/python benchmarks/cache_fidelity.py [--tokens 32]

Teachers (float64 logits, N tokens):
- ``zipf``: -log(rank) / 0.5 + 0.3 noise over a random permutation of the vocabulary (the peaked teacher
  of the earlier measurement, top-64 mass ~0.99). Logits only: the hidden-state format does not apply.
- ``lowrank``: an LM-shaped teacher ``h @ W.T`` (H_t = 896, Qwen2-0.5B's width; W Gaussian; h a
  Zipf-weighted sum of the rows of a few dozen plausible tokens plus noise), stored in float32 as a
  float32 teacher would be; every format applies.
Students: ``far`` (random logits, as at initialisation: the student's mass is mostly outside the
teacher's top-k) and ``near`` (0.7 * the teacher's log-probs + unit noise: a student part-way through
distillation).

Formats: top-k (float16 log-probs, int32 ids) with a uniform or a student-shaped tail; top-k plus m
tail tokens sampled from the teacher's tail with their exact log-probs; the teacher's final hidden
state (bf16 / fp16 / fp32, or int8 with one float32 scale per token), encoded and decoded by the
cache's own record format, with its lm_head stored once. Error = |value - online| / online and
||grad - online grad|| / ||online grad||, the gradient w.r.t. the student logits of all N tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from taid_vlm.losses import build_loss  # noqa: E402
from taid_vlm.losses.teacher_source import CachedTopKTeacher, OnlineTeacher  # noqa: E402
from taid_vlm.teacher_cache.format import decode, encode_hidden, hidden_bytes_per_token, hidden_tensor  # noqa: E402

V = 151_936
LOSSES = (("taid t=0.4", "taid", {"t_start": 0.4}), ("taid t=0.8", "taid", {"t_start": 0.8}),
          ("rkl", "rkl", {}), ("fkl", "fkl", {}))


def zipf_teacher(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ranks = torch.argsort(torch.rand(n, V, generator=g), -1).double() + 1.0
    return {"logits": -torch.log(ranks) / 0.5 + 0.3 * torch.randn(n, V, generator=g, dtype=torch.float64)}


def lowrank_teacher(n: int, hidden: int = 896, plausible: int = 48, scale: float = 16.0, seed: int = 2):
    """h @ W.T in float32: W [V, H] Gaussian with unit rows; h = scale * sum_j j^-1 W[a_j] + noise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, hidden, generator=g) / hidden**0.5
    heads = torch.stack([torch.randperm(V, generator=g)[:plausible] for _ in range(n)])
    weights = 1.0 / torch.arange(1, plausible + 1, dtype=torch.float32)
    h = scale * torch.einsum("j,njh->nh", weights, w[heads]) + 0.5 * torch.randn(n, hidden, generator=g)
    return {"hidden": h, "weight": w, "logits": (h @ w.T).double()}


def students(teacher_logits: torch.Tensor, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    n = teacher_logits.shape[0]
    far = 0.5 * torch.randn(n, 64, generator=g, dtype=torch.float64) @ (torch.randn(64, V, generator=g, dtype=torch.float64) / 8)
    near = 0.7 * torch.log_softmax(teacher_logits, -1) + torch.randn(n, V, generator=g, dtype=torch.float64)
    return {"far": far, "near": near}


def topk_arrays(logits: torch.Tensor, k: int):
    logp = torch.log_softmax(logits, -1)
    values, ids = logp.topk(k, -1)
    tail = torch.logsumexp(logp.scatter(1, ids, float("-inf")), -1)
    return ids.to(torch.int32), values.half(), tail.float()


def sampled_tail_arrays(logits: torch.Tensor, k: int, m: int, seed: int = 4):
    """Top-k plus m distinct tail tokens drawn from the teacher's tail (Gumbel-top-m: sampling without
    replacement in proportion to p), stored with their exact log-probs; the rest's mass as log_tail."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(logits, -1)
    _, top = logp.topk(k, -1)
    gumbel = -torch.log(-torch.log(torch.rand(logp.shape, generator=g, dtype=torch.float64)))
    _, extra = (logp + gumbel).scatter(1, top, float("-inf")).topk(m, -1)
    ids = torch.cat([top, extra], 1)
    tail = torch.logsumexp(logp.scatter(1, ids, float("-inf")), -1)
    return ids.to(torch.int32), logp.gather(1, ids).half(), tail.float()


def formats(teacher: dict):
    """name -> (TeacherSource, payload bytes per token)."""
    z = teacher["logits"]
    out = {}
    for k in (64, 256):
        arrays = topk_arrays(z, k)
        out[f"top-{k}, uniform tail"] = (CachedTopKTeacher(*arrays, tail="uniform"), 6 * k + 8)
        out[f"top-{k}, student tail"] = (CachedTopKTeacher(*arrays, tail="student"), 6 * k + 8)
    sampled = sampled_tail_arrays(z, 64, 64)
    out["top-64 + 64 sampled, uniform"] = (CachedTopKTeacher(*sampled, tail="uniform"), 6 * 128 + 8)
    out["top-64 + 64 sampled, student"] = (CachedTopKTeacher(*sampled, tail="student"), 6 * 128 + 8)
    if "hidden" in teacher:  # through the cache's own record encoding; the lm_head kept in the teacher's dtype
        h, w = teacher["hidden"], teacher["weight"]
        for name in ("bfloat16", "float16", "float32", "int8"):
            rec = decode(encode_hidden(np.zeros(h.shape[0], np.int32), h, name))
            stored = hidden_tensor(rec.hidden, name, rec.scale).to(h.dtype)
            out[f"hidden state, {name}"] = (OnlineTeacher(stored, w), hidden_bytes_per_token(h.shape[1], name))
    return out


def loss_and_grad(loss_name: str, params: dict, student: torch.Tensor, teacher: torch.Tensor):
    z = student.clone().requires_grad_()
    value = build_loss(loss_name, **params).double()(z, teacher, torch.ones(z.shape[0], dtype=torch.bool))
    (grad,) = torch.autograd.grad(value, [z])
    return float(value.detach()), grad


def errors(teacher: dict, student: torch.Tensor):
    """{(format, loss label): (value rel error, grad rel error)}, plus the formats' bytes per token."""
    online = teacher["logits"]
    ref = {label: loss_and_grad(name, p, student, online) for label, name, p in LOSSES}
    table, sizes = {}, {}
    for fmt_name, (source, size) in formats(teacher).items():
        sizes[fmt_name] = size
        dense = source.fill_for_student(torch.empty_like(online), 0, online.shape[0], student)
        for label, name, p in LOSSES:
            value, grad = loss_and_grad(name, p, student, dense)
            v0, g0 = ref[label]
            table[fmt_name, label] = (abs(value - v0) / abs(v0), float((grad - g0).norm() / g0.norm()))
    return table, sizes


def top_mass(logits: torch.Tensor, k: int = 64) -> float:
    return float(torch.log_softmax(logits, -1).topk(k, -1).values.exp().sum(-1).mean())


def _print_table(t_name: str, s_name: str, teacher: dict, student: torch.Tensor) -> None:
    table, sizes = errors(teacher, student)
    v = teacher["logits"].shape[1]
    print(f"\nteacher {t_name} (V = {v}, {teacher['logits'].shape[0]} tokens, top-64 mass "
          f"{top_mass(teacher['logits']):.4f}), student {s_name}: relative gradient error (value error)")
    print(f"{'format':32s} {'B/token':>8s} " + " ".join(f"{label:>18s}" for label, _, _ in LOSSES))
    for fmt_name, size in sizes.items():
        cells = [table[fmt_name, label] for label, _, _ in LOSSES]
        print(f"{fmt_name:32s} {size:8d} " + " ".join(f"{g:8.2%} ({v:7.2%})" for v, g in cells))


def fidelity_tables(tokens: int = 32) -> None:
    """One table per (synthetic teacher, student)."""
    for t_name, make in (("zipf", zipf_teacher), ("lowrank", lowrank_teacher)):
        teacher = make(tokens)
        for s_name, student in students(teacher["logits"]).items():
            _print_table(t_name, s_name, teacher, student)


def train_time_cost(tokens: int = 256, student_hidden: int = 896, teacher_hidden: int = 896, reps: int = 2) -> None:
    """Seconds of one chunked TAID loss forward+backward (fp32, CPU) at V = 151,936 with the teacher side
    from a top-64 cache vs a hidden-state cache (the extra [N, H_t] x [H_t, V] matmul per chunk)."""
    import time

    g = torch.Generator().manual_seed(5)
    hs = torch.randn(tokens, student_hidden, generator=g).requires_grad_()
    ws = (torch.randn(V, student_hidden, generator=g) / student_hidden**0.5).requires_grad_()
    ht, wt = torch.randn(tokens, teacher_hidden, generator=g), torch.randn(V, teacher_hidden, generator=g) / 30
    sources = {"top-64 cache": CachedTopKTeacher(*topk_arrays(ht @ wt.T, 64)),
               "hidden-state cache": OnlineTeacher(ht, wt)}
    loss = build_loss("taid")
    times = {}
    for name, source in sources.items():
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            loss.fused(hs, ws, teacher=source).backward()
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    base = times["top-64 cache"]
    print(f"\ntrain-time cost (TAID, fp32 CPU, N = {tokens}, V = {V}, H_S = {student_hidden}, H_T = {teacher_hidden})")
    for name, t in times.items():
        print(f"{name:24s} {t:8.2f} s  ({t / base:.2f}x)")


def text_bed_tables(root: Path, tokens: int = 512) -> None:
    """The real-text bed's largest teacher (``root``/runs/text_bed/gap/teachers/l/model, trained with CE on
    Python source; V = 4096) on the first ``tokens`` held-out tokens; students: a random-initialised
    text-bed student (far) and the bed's small teacher (s) standing in for a trained student (near)."""
    from taid_vlm.data import build_loader
    from taid_vlm.train.components import build_role_model
    from taid_vlm.train.objective import hidden_at

    tok = {"path": str(root / "data/text_bed/tokenizer")}

    def load(folder):
        return build_role_model({"type": "causal_lm", "dtype": "float32", "tokenizer": tok,
                                 "llm": {"path": str(folder), "attn_implementation": "sdpa"}}, "teacher").eval()

    teacher, near = load(root / "runs/text_bed/gap/teachers/l/model"), load(root / "runs/text_bed/gap/teachers/s/model")
    torch.manual_seed(0)
    far = build_role_model({"type": "causal_lm", "dtype": "float32", "tokenizer": tok, "llm": {"config": {
        "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "tie_word_embeddings": True}}}, "student").eval()
    v = len(teacher.tokenizer)
    shards = sorted(str(p) for p in (root / "data/text_bed/val").glob("*.tar"))
    loader = build_loader(shards, far.input_spec, teacher.input_spec, mode="eval", batch_size=8, max_length=192,
                          num_workers=0, text_only=True)
    parts = {"hidden": [], "far": [], "near": []}
    with torch.no_grad():
        for b in loader:
            parts["hidden"].append(hidden_at(teacher, b["teacher"]))
            parts["near"].append(hidden_at(near, b["teacher"]) @ near.output_weight()[:v].T)
            parts["far"].append(hidden_at(far, b["student"]) @ far.output_weight()[:v].T)
            if sum(x.shape[0] for x in parts["hidden"]) >= tokens:
                break
    h = torch.cat(parts["hidden"])[:tokens]
    w = teacher.output_weight().detach()[:v]
    bed = {"hidden": h, "weight": w, "logits": (h @ w.T).double()}
    for s_name in ("far", "near"):
        _print_table("text-bed L", s_name, bed, torch.cat(parts[s_name])[:tokens].double())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--text-bed", type=Path, help="a checkout holding the real-text bed (data/text_bed, "
                    "runs/text_bed/gap/teachers/{s,l}/model): measure on its teacher too")
    ap.add_argument("--text-bed-tokens", type=int, default=512)
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    fidelity_tables(a.tokens)
    if a.text_bed is not None:
        text_bed_tables(a.text_bed, a.text_bed_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
