"""The held-out generation metric (train/generation_metric.py): ROUGE-L against hand-computed LCS values,
exact match, the reference answer of a rendered conversation, and the scorer on the student's own greedy
answers (a reference equal to the answer scores 1, another does not), the first-N rule and raw text."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GenerationConfig

from taid_vlm.config import load_config
from taid_vlm.data.collate import collate
from taid_vlm.data.render import Renderer, pad_token_id
from taid_vlm.data.samples import Sample
from taid_vlm.experiments.report import harness_metrics
from taid_vlm.models import build_model
from taid_vlm.train.generation_metric import (GenerationScorer, answer_rows, exact_match, reference_ids,
                                              rouge_l)
from taid_vlm.train.sampling.completions import left_padded
from taid_vlm.train.sampling.generation import stop_token_ids
from tests.models_helpers import load_cfg
from tests.train_helpers import CONFIGS


def lcs_f1(prediction: str, reference: str) -> float:
    """Reference: ROUGE-L F1 = 2PR / (P + R), P = LCS / |prediction|, R = LCS / |reference|, on whitespace words."""
    a, b = prediction.split(), reference.split()
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


@pytest.mark.parametrize("prediction,reference,want", [
    ("the cat sat on the mat", "the cat lay on the mat", 5 / 6),   # LCS 5 of 6 and 6
    ("a b c d", "a c e", 4 / 7),                                    # LCS "a c": P 1/2, R 2/3
    ("one two", "two one", 0.5),                                    # LCS 1: order matters
    ("red", "blue", 0.0),
    ("at the top left", "at the top left", 1.0),
])
def test_rouge_l_is_the_lcs_f1(prediction, reference, want):
    assert lcs_f1(prediction, reference) == pytest.approx(want, abs=1e-12)
    assert rouge_l(prediction, reference) == pytest.approx(want, abs=1e-12)


def test_rouge_l_tokenizes_as_the_official_code():
    """rouge_score's tokenizer with the stemmer (the official TAID metric): case, punctuation and plural fold."""
    assert rouge_l("At the top LEFT.", "at the top left") == 1.0
    assert rouge_l("Three circles!", "three circle") == 1.0
    assert rouge_l("", "blue") == 0.0


def test_exact_match_strips_whitespace_only():
    assert exact_match(" blue\n", "blue")
    assert not exact_match("Blue", "blue")
    assert not exact_match("blue.", "blue")


def test_compare_shows_the_generation_columns_only_when_runs_have_them():
    keys = ["eval_kl", "eval_rougeL", "eval_exact_match", "eval_harness/task/acc"]
    assert [k for k, _, _ in harness_metrics(keys)] == ["eval_rougeL", "eval_exact_match", "eval_harness/task/acc"]
    assert harness_metrics(["eval_kl", "eval_student_ce"]) == ()


@pytest.fixture(scope="module")
def student():
    """The tiny student after a few steps on one conversation: a random tied-embedding model only repeats the
    prompt's last token ("\n", which strips to nothing); this one writes letters."""
    torch.manual_seed(0)
    model = build_model(load_cfg("tiny_text_student"))
    fit_answers(model, _batch(model, [_chat("a", "blue")])["student"])
    return model.eval()


def fit_answers(model, part: dict, steps: int = 40) -> None:
    """A few Adam steps of plain CE on a collated part: the tiny model starts to write its answers."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model.llm(input_ids=part["input_ids"], attention_mask=part["attention_mask"], labels=part["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _chat(key: str, answer: str) -> Sample:
    return Sample(key, messages=[{"role": "user", "content": "Scene: a red circle.\nWhat color is the circle?"},
                                 {"role": "assistant", "content": "red"},
                                 {"role": "user", "content": f"Where is it ({key})?"},
                                 {"role": "assistant", "content": answer}])


def _batch(model, samples, prompt_tokens: int = 0) -> dict:
    render = Renderer(model.input_spec, max_length=256, prompt_tokens=prompt_tokens)
    return {"student": collate([render(s) for s in samples], pad_token_id(model.tokenizer)),
            "keys": [s.key for s in samples]}


def test_reference_is_the_last_answer_and_raw_text_has_none(student):
    batch = _batch(student, [_chat("a", "At the top left."), Sample("doc", text="A plain document.")])
    part = batch["student"]
    assert answer_rows(part) == [0]
    n, length = int(part["prompt_lengths"][0]), int(part["attention_mask"][0].sum())
    ref = reference_ids(part["input_ids"][0].tolist(), n, length, stop_token_ids(student))
    assert ref[-1] in stop_token_ids(student)
    assert student.tokenizer.decode(ref, skip_special_tokens=True).strip() == "At the top left."


def _greedy_text(model, sample: Sample, tokens: int, prompt_tokens: int = 0) -> str:
    """The model's greedy answer to the sample's prompt, alone (no batch), by transformers' generate."""
    part = _batch(model, [sample], prompt_tokens)["student"]
    pad = pad_token_id(model.tokenizer)
    ids, mask = left_padded([part["input_ids"][0, : part["prompt_lengths"][0]].tolist()], pad)
    gen = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=sorted(stop_token_ids(model)),
                           pad_token_id=pad)
    with torch.no_grad():
        out = model.generate_tokens(ids, mask, None, generation_config=gen)
    return model.tokenizer.decode(out[0].tolist(), skip_special_tokens=True)


def _scorer(model, limit: int, tokens: int = 6) -> GenerationScorer:
    cfg = load_config(CONFIGS / "tiny_text.yaml", [f"train.eval_generation={limit}",
                                                   f"train.eval_max_new_tokens={tokens}"])
    return GenerationScorer(cfg, model, None, 0, 1, torch.device("cpu"))


def test_scorer_scores_the_students_own_greedy_answer_as_a_match(student, caplog):
    own = _greedy_text(student, _chat("a", "x"), 6).strip()
    assert any(c.isalnum() for c in own), own  # a scorable answer (else the case below tests nothing)
    samples = [Sample("doc", text="A plain document."), _chat("a", own), _chat("b", "At the bottom right.")]
    other = _greedy_text(student, samples[2], 6)
    batch = _batch(student, samples)

    scorer = _scorer(student, 5)
    with caplog.at_level(logging.INFO, logger="taid_vlm.train"):
        scorer.add(batch)
        got = scorer.result()
    assert got["eval_generated"] == 2 and got["eval_exact_match"] == 0.5
    assert got["eval_rougeL"] == pytest.approx((1.0 + rouge_l(other, "At the bottom right.")) / 2, abs=1e-12)
    assert got["eval_rougeL"] < 1.0
    assert "1 held-out raw-text samples" in caplog.text

    first = _scorer(student, 1)  # the first N conversations in evaluation order, then nothing more
    first.add(batch)
    first.add(batch)
    assert first.result() == {"eval_rougeL": 1.0, "eval_exact_match": 1.0, "eval_generated": 1}
    # built once per run: each evaluation starts from zero and gives the same numbers again
    scorer.start().add(batch)
    assert scorer.result() == got
    first.start().add(batch)
    assert first.result() == {"eval_rougeL": 1.0, "eval_exact_match": 1.0, "eval_generated": 1}


def test_raw_text_with_prompt_tokens_scores_the_greedy_continuation(student):
    """data.prompt_tokens P: a raw document's first P tokens are the prompt; the reference is its next
    max_new_tokens tokens. The scorer equals the direct computation: transformers' greedy generate from the
    first P tokens alone, ROUGE-L and exact match against the decoded next tokens."""
    P, N = 4, 5
    docs = [Sample("d0", text="def add(a, b):\n    return a + b\n"), Sample("d1", text="x = [i * i for i in range(9)]")]
    tok = student.tokenizer
    want_rouge, want_match = [], []
    for doc in docs:
        ids = tok(doc.text, add_special_tokens=True)["input_ids"]
        assert len(ids) > P + N  # the reference is cut at N tokens, not at the document's end
        reference = tok.decode(ids[P:P + N], skip_special_tokens=True)
        got = _greedy_text(student, doc, N, prompt_tokens=P)
        want_rouge.append(rouge_l(got, reference))
        want_match.append(float(exact_match(got, reference)))
    batch = _batch(student, docs, prompt_tokens=P)
    assert batch["student"]["prompt_lengths"].tolist() == [P, P]
    scorer = _scorer(student, 10, tokens=N)
    scorer.add(batch)
    got = scorer.result()
    assert got["eval_generated"] == 2
    assert got["eval_rougeL"] == pytest.approx(sum(want_rouge) / 2, abs=1e-12)
    assert got["eval_exact_match"] == sum(want_match) / 2

    # the student fitted to continue d0 writes its next tokens exactly: a match that the scorer sees
    fitted = build_model(load_cfg("tiny_text_student"))
    fitted.load_state_dict(student.state_dict())
    fit_answers(fitted, _batch(fitted, docs[:1])["student"], steps=150)
    fitted.eval()
    scorer = _scorer(fitted, 10, tokens=N)
    scorer.add(_batch(fitted, docs[:1], prompt_tokens=P))
    assert scorer.result() == {"eval_rougeL": 1.0, "eval_exact_match": 1.0, "eval_generated": 1}
