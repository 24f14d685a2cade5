"""Batched Hugging Face `generate` (KV cache) of completions, each row sampled with its own
torch.Generator seeded by its GLOBAL sample index, so a completion does not depend on the rank, the
world size or the other rows; greedy when sampling.do_sample is false (the official TAID default)."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Optional, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, TopPLogitsWarper

from taid_vlm.config import SamplingConfig

from .completions import cut_completion, left_padded
from .draw import draw_rows, softmax_weights


def generation_seed(seed: int, index: int) -> int:
    """A 63-bit seed from (run seed, global sample index)."""
    digest = hashlib.blake2b(f"generate:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RowSeededSampler(LogitsProcessor):
    """Temperature and top-p (Hugging Face's warpers' order), then one draw per row by inverse CDF from one
    uniform number of that row's generator (draw.py); returns scores that leave only the drawn token
    finite, so `generate` in greedy mode takes it (generate itself has one RNG for the whole batch)."""

    def __init__(self, generators: Sequence[torch.Generator], temperature: float, top_p: float):
        self.generators = list(generators)
        self.temperature = float(temperature)
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1 else None  # top_p 1: a no-op, and its sort is not

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scaled = scores.float() / self.temperature  # a new tensor: generate's own scores stay as they are
        if self.top_p is not None:
            scaled = self.top_p(input_ids, scaled)
        weights = softmax_weights(scaled)
        uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64, device=g.device)
                                for g in self.generators])
        picks = draw_rows(weights, uniforms)
        return weights.fill_(float("-inf")).scatter_(1, picks.unsqueeze(1), 0.0)


def stop_token_ids(model) -> set:
    """End of turn: the tokenizer's eos and the model's own generation config's eos ids."""
    ids = {model.tokenizer.eos_token_id}
    llm = getattr(model, "llm", None) or getattr(model, "hf", None)
    extra = getattr(getattr(llm, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return {int(i) for i in ids if i is not None}


@contextlib.contextmanager
def generation_mode(model) -> Iterator[None]:
    """eval() while generating (no dropout; gradient checkpointing would switch the KV cache off)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_completions(model, prompts: Sequence[Sequence[int]], indices: Sequence[int], limits: Sequence[int],
                         cfg: SamplingConfig, seed: int, pad_id: int, device: torch.device,
                         pixel_values: Optional[object] = None) -> list[list[int]]:
    """One completion per prompt (ids, stop token included, row b at most ``limits[b]`` tokens)."""
    ids, mask = left_padded(prompts, pad_id)
    stop = stop_token_ids(model)
    gen = GenerationConfig(max_new_tokens=max(1, min(cfg.max_new_tokens, max(limits))), do_sample=False,
                           num_beams=1, eos_token_id=sorted(stop), pad_token_id=pad_id)
    processors = []
    if cfg.do_sample:
        generators = [torch.Generator(device=device).manual_seed(generation_seed(seed, i)) for i in indices]
        processors.append(RowSeededSampler(generators, cfg.temperature, cfg.top_p))
    with generation_mode(model):
        new = model.generate_tokens(ids.to(device), mask.to(device), pixel_values, generation_config=gen,
                                    logits_processor=processors)
    return [cut_completion(row.tolist(), stop, limit) for row, limit in zip(new.cpu(), limits)]
