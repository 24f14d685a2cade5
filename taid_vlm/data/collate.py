"""Rendered samples -> tensors for one model: right padding, or packing for text-only batches.

``collate`` pads every row to the longest in the batch (``pad_to_multiple_of`` optional), labels -100
on padding, and concatenates the images of the batch sample-major into ``pixel_values [M, 3, H, W]``
(None when the batch has no image); for a dynamic-resolution model ``pixel_values`` is instead the
dict of its processor's tensors (``collate_image_inputs``). ``collate_packed`` lays several documents into one row each,
restarting ``position_ids`` at 0 for every document; the first token of a document is never
supervised, so no loss position predicts across a document boundary. ``attention_mask`` is 1 over
all real tokens of a packed row (it counts tokens; pads sit only at the row end, position 0 each);
``position_ids`` are what isolates the documents: a model given them drops the 2-D mask and lets
transformers build per-document attention from them (taid_vlm/models/packing.py).
Both add ``loss_positions``/``loss_targets`` (align.loss_positions); ``collate`` also ``prompt_lengths``
(per row, the tokens before the last assistant turn: render.prompt_length), where generation starts.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .align import loss_positions
from .render import IGNORE_INDEX, Rendered


def _round_up(n: int, m: Optional[int]) -> int:
    return n if not m else ((n + m - 1) // m) * m


def _finish(input_ids, attention_mask, labels, pixels, position_ids=None) -> Dict[str, torch.Tensor]:
    pos, tgt = loss_positions(labels)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
           "pixel_values": torch.cat(pixels) if pixels else None,
           "loss_positions": pos, "loss_targets": tgt}
    if position_ids is not None:
        out["position_ids"] = position_ids
    return out


def collate(items: Sequence[Rendered], pad_id: int, pad_to_multiple_of: Optional[int] = None) -> Dict:
    B = len(items)
    T = _round_up(max(len(r) for r in items), pad_to_multiple_of)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, r in enumerate(items):
        n = len(r)
        input_ids[b, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        attention_mask[b, :n] = 1
        labels[b, :n] = torch.tensor(r.labels, dtype=torch.long)
    pixels = [r.pixel_values for r in items if r.pixel_values is not None]
    out = _finish(input_ids, attention_mask, labels, pixels)
    out["prompt_lengths"] = torch.tensor([r.prompt_length for r in items], dtype=torch.long)
    image_inputs = [r.image_inputs for r in items if r.image_inputs]
    if image_inputs:
        out["pixel_values"] = collate_image_inputs(image_inputs)
    return out


def collate_image_inputs(per_sample: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Per-sample processor tensors -> the batch's: concatenated along dim 0 in sample order, other dims
    zero-padded to the largest (e.g. LLaVA-NeXT's tiles per image, Idefics3's image sizes), as the
    families' own processors batch them."""
    out = {}
    for key in per_sample[0]:
        parts = [d[key] for d in per_sample]
        if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
            dims = [max(p.shape[i] for p in parts) for i in range(1, parts[0].dim())]
            parts = [torch.nn.functional.pad(p, [x for d, size in zip(reversed(dims), reversed(p.shape[1:]))
                                                 for x in (0, d - size)]) for p in parts]
        out[key] = torch.cat(parts)
    return out


def collate_packed(rows: Sequence[Sequence[Rendered]], pad_id: int,
                   pad_to_multiple_of: Optional[int] = None) -> Dict:
    B = len(rows)
    T = _round_up(max(sum(len(d) for d in row) for row in rows), pad_to_multiple_of)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for d in row:
            n = len(d)
            input_ids[b, at:at + n] = torch.tensor(d.input_ids, dtype=torch.long)
            lab = torch.tensor(d.labels, dtype=torch.long)
            lab[0] = IGNORE_INDEX
            labels[b, at:at + n] = lab
            position_ids[b, at:at + n] = torch.arange(n)
            at += n
        attention_mask[b, :at] = 1
    return _finish(input_ids, attention_mask, labels, [], position_ids)


class GreedyPacker:
    """Streams documents into rows of at most ``max_length`` tokens for EVERY model (a document goes
    to the current row if it fits for all models, else it starts a new row); documents are never
    split. ``add`` returns the finished rows once ``batch_size`` rows are complete (the document that
    did not fit stays in the packer and starts the next batch). Items are tuples
    ``(key, [Rendered per model], extra)``; a row is a list of such items."""

    def __init__(self, batch_size: int, max_length: int):
        self.batch_size, self.max_length = batch_size, max_length
        self.rows: List[list] = []
        self.current: list = []
        self.used: List[int] = []

    def add(self, item) -> Optional[List[list]]:
        lengths = [len(r) for r in item[1]]
        fits = self.current and all(u + n <= self.max_length for u, n in zip(self.used, lengths))
        out = None
        if self.current and not fits:
            self.rows.append(self.current)
            self.current, self.used = [], []
            if len(self.rows) == self.batch_size:
                out, self.rows = self.rows, []
        self.current.append(item)
        self.used = [u + n for u, n in zip(self.used, lengths)] if self.used else lengths
        return out

    def flush(self) -> Optional[List[list]]:
        rows = self.rows + ([self.current] if self.current else [])
        self.rows, self.current, self.used = [], [], []
        return rows or None
