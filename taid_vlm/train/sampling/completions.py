"""A micro-batch rebuilt from generated completions, for one model: each row is that model's own
rendering of the prompt followed by the completion ids; the labels are exactly the completion (the
prompt is never supervised); right padding, ``loss_positions`` and ``loss_targets`` as the data's
collate step makes them (the official TAID `run_sample` and TRL's `generate_on_policy_outputs` build the
same rows, left-padded: the supervised tokens and what predicts them are the same)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from taid_vlm.data.collate import collate
from taid_vlm.data.render import IGNORE_INDEX, Rendered


def cut_completion(tokens: Sequence[int], stop_ids: set, limit: int) -> list[int]:
    """The generated tokens up to and including the first stop token (end of turn), at most `limit`."""
    out = []
    for t in list(tokens)[:limit]:
        out.append(int(t))
        if int(t) in stop_ids:
            break
    return out


def prompts_of(part: dict) -> list[list[int]]:
    """Each row's prompt ids from a collated part (``prompt_lengths``: data/render.prompt_length)."""
    return [row[:n].tolist() for row, n in zip(part["input_ids"], part["prompt_lengths"].tolist())]


def completion_part(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
                    pixel_values: Optional[object] = None) -> dict:
    """The model's part of a batch (as data.collate makes it) for prompt + completion rows; the images of
    the rows (``pixel_values``, already collated) ride along unchanged: they are all in the prompts."""
    items = [Rendered(list(p) + list(c), [IGNORE_INDEX] * len(p) + list(c), prompt_length=len(p))
             for p, c in zip(prompts, completions)]
    part = collate(items, pad_id)
    part["pixel_values"] = pixel_values
    return part


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) ``[B, L]`` with the prompts right-aligned, as `generate` wants them."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        if p:
            ids[b, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[b, width - len(p):] = 1
    return ids, mask


def check_images_in_prompts(part: dict, image_token_id, keys: Sequence[str], role: str) -> None:
    """The rebuilt rows keep only the prompts, and the batch's images go with them: an image token after
    a row's prompt (an image inside or after the last assistant turn) would lose its place."""
    if image_token_id is None:
        return
    for row, n, key in zip(part["input_ids"], part["prompt_lengths"].tolist(), keys):
        if bool((row[n:] == image_token_id).any()):
            raise ValueError(f"sample {key!r} ({role}): an image comes after the start of the last assistant "
                             "turn; sampling generates from the conversation before it, images included")
