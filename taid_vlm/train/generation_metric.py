"""Evaluation that sees generation: the student's greedy answers to the first N held-out conversations
(train.eval_generation), scored against the reference answers.

- prompt: the sample up to its last assistant turn, images included (data/render.prompt_length), the
  student's own rendering; greedy, stopped at the end-of-turn token (sampling/generation.py), at most
  train.eval_max_new_tokens (0: sampling.max_new_tokens) new tokens and never past data.max_length.
- reference: the last assistant answer of the sample, the tokens after the prompt up to the end of turn,
  decoded without special tokens (what the student is trained to write). A raw-text document with
  data.prompt_tokens P >= 2: the prompt is its first P tokens and the reference is the document's next
  tokens, as many as the answer may have (a continuation has no end of turn to stop at).
- eval_rougeL: ROUGE-L F1 as the official TAID code reports it (src/metrics.py: Hugging Face
  `evaluate`'s "rouge", i.e. Google's rouge_score with rougeL and use_stemmer=True, so its default
  tokenizer: lowercase, runs of [a-z0-9] (anything else, non-Latin scripts included, is dropped), Porter
  stem of tokens longer than 3 characters); mean over samples, as a fraction (the official code prints x100
  and takes the mean through a bootstrap aggregator, whose mid estimate is that mean).
- eval_exact_match: the decoded answer equals the reference after stripping surrounding whitespace
  (stricter than the official code's SQuAD-style normalisation: no lowercasing, punctuation kept).
- eval_generated: how many samples were scored (N, or fewer when the held-out set is smaller).

The first N: in evaluation order, rank 0's rows of an eval batch before rank 1's, so every rank computes the
same numbers (sums over ranks). Raw-text samples (a `text` document, no conversation) without
data.prompt_tokens have no answer: they are skipped and said so once. Under ZeRO-3 every rank gathers the student while any rank generates
(zero3.generation_ready); that happens only for the batches that still hold unscored samples.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional, Sequence

import torch

from taid_vlm.config import RunConfig
from taid_vlm.data.render import IGNORE_INDEX, pad_token_id

from .launch_env import all_reduce_sum
from .sampling.completions import check_images_in_prompts, cut_completion, prompts_of
from .sampling.generation import generate_completions, stop_token_ids
from .zero3 import generation_ready

log = logging.getLogger("taid_vlm.train")


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score logs "Using default tokenizer." per scorer
    return RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one answer (the official TAID code's scorer: rouge_score, stemmed)."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def reference_ids(row: Sequence[int], prompt_length: int, length: int, stop_ids: set,
                  limit: Optional[int] = None) -> list[int]:
    """The last answer's ids in a rendered row: after the prompt, up to and including the end of turn
    (and at most `limit` tokens)."""
    return cut_completion(list(row)[prompt_length:length], stop_ids, length if limit is None else limit)


def answer_rows(part: dict) -> list[int]:
    """The rows with a prompt to answer: conversations, and raw documents given data.prompt_tokens >= 2
    (without it a raw document's prompt is its first token only: render.Renderer)."""
    return [b for b, n in enumerate(part["prompt_lengths"].tolist()) if n > 1]


def is_raw_text(labels: Sequence[int], prompt_length: int) -> bool:
    """A raw document supervises its prompt tokens (all but the first); a conversation never supervises
    the token before its last answer (the assistant turn's header)."""
    return prompt_length > 1 and int(labels[prompt_length - 1]) != IGNORE_INDEX


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
    log.info(message)


class GenerationScorer:
    """Built once per run; ``start()`` before each evaluation, then fed every evaluation batch on every rank
    (None where this rank has run out); ``result()`` at the end."""

    def __init__(self, cfg: RunConfig, model, engine, rank: int, world: int, device: torch.device):
        self.model, self.engine, self.rank, self.world, self.device = model, engine, rank, world, device
        self.limit, self.max_length = cfg.train.eval_generation, cfg.data.max_length
        tokens = cfg.train.eval_max_new_tokens or cfg.sampling.max_new_tokens
        self.sampling = dataclasses.replace(cfg.sampling, do_sample=False, max_new_tokens=tokens)
        self.pad, self.stop = pad_token_id(model.tokenizer), stop_token_ids(model)
        self.image_token_id = model.input_spec.image_token_id
        self.start()

    def start(self) -> "GenerationScorer":
        """A new evaluation: the counts start at zero."""
        self.taken = self.plain = 0  # over all ranks
        self.sums = [0.0, 0.0, 0.0]  # this rank: ROUGE-L, exact matches, samples
        return self

    def add(self, batch: Optional[dict]) -> None:
        if self.taken >= self.limit:
            return
        part = batch["student"] if batch is not None else None
        rows = answer_rows(part) if part is not None else []
        counts = [0.0] * self.world + [float(len(batch["keys"]) - len(rows)) if batch is not None else 0.0]
        counts[self.rank] = float(len(rows))
        counts = [int(c) for c in all_reduce_sum(counts, self.device)]
        before = self.taken + sum(counts[:self.rank])
        mine = rows[:max(0, min(len(rows), self.limit - before))]
        self.taken, self.plain = self.taken + sum(counts[:self.world]), self.plain + counts[self.world]
        if sum(counts[:self.world]) == 0:
            return
        with generation_ready(self.engine):  # every rank enters: a collective gather under ZeRO-3
            if mine:
                self._score(part, batch["keys"], mine)

    def _score(self, part: dict, keys: list, mine: list[int]) -> None:
        pixels = part.get("pixel_values")
        if self.image_token_id is not None:
            check_images_in_prompts(part, self.image_token_id, keys, "student")
        # the batch's images belong to all its rows: with images, every row generates and `mine` are scored
        rows = list(range(len(keys))) if pixels is not None else mine
        prompts = [p for b, p in enumerate(prompts_of(part)) if b in rows]
        limits = [max(1, self.max_length - len(p)) for p in prompts]
        answers = generate_completions(self.model, prompts, [0] * len(prompts), limits, self.sampling, 0, self.pad,
                                       self.device, pixels)
        decode = self.model.tokenizer.decode
        lengths = part["attention_mask"].sum(-1).tolist()
        for b, answer in zip(rows, answers):
            if b not in mine:
                continue
            start = int(part["prompt_lengths"][b])
            cap = self.sampling.max_new_tokens if is_raw_text(part["labels"][b], start) else None
            ref = reference_ids(part["input_ids"][b].tolist(), start, lengths[b], self.stop, cap)
            got, want = decode(answer, skip_special_tokens=True), decode(ref, skip_special_tokens=True)
            self.sums[0] += rouge_l(got, want)
            self.sums[1] += float(exact_match(got, want))
            self.sums[2] += 1.0

    def result(self) -> dict[str, float]:
        """{} when nothing was scored; the same numbers on every rank."""
        rouge, matches, n = all_reduce_sum(self.sums, self.device)
        if self.plain:
            _say_once(f"eval_generation: {self.plain} held-out raw-text samples (no conversation, so no answer) "
                      "were skipped; set data.prompt_tokens to score the continuation of their first tokens")
        if n == 0:
            return {}
        return {"eval_rougeL": rouge / n, "eval_exact_match": matches / n, "eval_generated": int(n)}


def build_generation_scorer(cfg: RunConfig, model, engine, rank: int, world: int,
                            device: torch.device) -> Optional[GenerationScorer]:
    """None with train.eval_generation 0 (the default: evaluation as before)."""
    if not cfg.train.eval_generation:
        return None
    return GenerationScorer(cfg, model, engine, rank, world, device)
