"""Held-out answer exact match: does greedy decoding reproduce the whole answer?

Under teacher forcing, an answer turn (the supervised tokens of one assistant message, its end-of-turn
token included) is counted correct when the model's argmax is right at EVERY token of it. That is
exactly when greedy decoding from the prompt produces the answer verbatim, so this is the exact-match
score of greedy generation, computed with one forward pass per batch. The trainer's
``eval_student_acc`` is the per-TOKEN version (easier: the end-of-turn token and "At the" are nearly
free); this is the per-ANSWER one, broken down by the kind of question in the synthetic shapes data.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional, Union

from taid_vlm.data.render import IGNORE_INDEX
from taid_vlm.data.synthetic import COLORS, NUMBERS, SHAPES

# the answer vocabulary of the synthetic-shapes data
COLOR_WORDS, SHAPE_WORDS, NUMBER_WORDS = set(COLORS), set(SHAPES), set(NUMBERS)


def answer_kind(text: str) -> str:
    """The question type of a synthetic-shapes answer, from the answer itself."""
    t = text.strip().rstrip(".").lower()
    if t in COLOR_WORDS:
        return "color"
    if t in SHAPE_WORDS:
        return "shape"
    if t in NUMBER_WORDS:
        return "count"
    if t.startswith("at the"):
        return "position"
    if t in ("the first", "the second"):
        return "which image"
    return "other"


def turns_of(labels_row) -> list[list[int]]:
    """Positions of each maximal run of supervised tokens (one assistant turn each)."""
    runs, current, prev = [], [], None
    for i, y in enumerate(labels_row):
        if y == IGNORE_INDEX:
            continue
        if current and prev is not None and i != prev + 1:
            runs.append(current)
            current = []
        current.append(i)
        prev = i
    if current:
        runs.append(current)
    return runs


def answer_exact_match(model_or_dir, val_shards: Union[str, list], *, text_only: bool = False, batch_size: int = 16,
                       max_length: int = 256, max_batches: int = 0) -> dict:
    """{exact_match, answers, by_kind: {kind: (correct, total)}} of a model on held-out conversations."""
    import torch

    from taid_vlm.data import build_loader
    from taid_vlm.models import load_model

    model = load_model(model_or_dir, role="teacher") if isinstance(model_or_dir, (str, Path)) else model_or_dir
    model.eval()
    tok = model.tokenizer
    vocab = len(tok)
    loader = build_loader(val_shards, model.input_spec, None, mode="eval", batch_size=batch_size,
                          max_length=max_length, num_workers=0, text_only=text_only)
    correct, total = Counter(), Counter()
    with torch.no_grad():
        for n, batch in enumerate(loader):
            if max_batches and n >= max_batches:
                break
            s = batch["student"]
            logits = model(s["input_ids"], s["attention_mask"], s.get("pixel_values"), s.get("position_ids"))
            pred = logits[..., :vocab].argmax(-1)  # pred[b, i] predicts the token at i + 1
            labels = s["labels"]
            for b in range(labels.shape[0]):
                row = labels[b].tolist()
                for turn in turns_of(row):
                    target = [row[i] for i in turn]
                    guess = [int(pred[b, i - 1]) for i in turn]
                    kind = answer_kind(tok.decode(target, skip_special_tokens=True))
                    total[kind] += 1
                    correct[kind] += int(guess == target)
    answers = sum(total.values())
    return {"exact_match": sum(correct.values()) / answers if answers else float("nan"), "answers": answers,
            "by_kind": {k: (correct[k], total[k]) for k in sorted(total)}}


def exact_match_rows(results: dict, order: Optional[list] = None) -> tuple[list[str], list[list[str]]]:
    """A table: one row per model, overall exact match then each question kind."""
    kinds = sorted({k for r in results.values() for k in r["by_kind"]})
    header = ["model", "answers", "exact match"] + kinds
    rows = []
    for name in order or list(results):
        r = results[name]
        row = [name, str(r["answers"]), f"{r['exact_match']:.3f}"]
        for k in kinds:
            c, t = r["by_kind"].get(k, (0, 0))
            row.append(f"{c / t:.3f} ({t})" if t else "–")
        rows.append(row)
    return header, rows
