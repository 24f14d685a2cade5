"""Validation of the mask and labels every loss path shares (plain and chunked)."""

from __future__ import annotations

import torch


def check_mask_and_labels(loss, n: int, v: int, mask, labels, device) -> torch.Tensor:
    """Validate mask [N] and labels [N] for ``loss`` (a DistillationLoss); return the mask as bool."""
    if mask is None:
        mask = torch.ones(n, dtype=torch.bool, device=device)
    if mask.shape != (n,):
        raise ValueError(f"{loss.name}: mask must have shape ({n},), got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise ValueError(f"{loss.name}: mask must be bool (or integer 0/1), got {mask.dtype}")
        mask = mask != 0
    needs_labels = loss.needs_labels or loss.ce_weight > 0
    if needs_labels and labels is None:
        why = "ce_weight > 0" if not loss.needs_labels else "it uses the ground-truth token"
        raise ValueError(f"{loss.name}: labels are required ({why})")
    if labels is not None:
        if labels.shape != (n,):
            raise ValueError(f"{loss.name}: labels must have shape ({n},), got {tuple(labels.shape)}")
        used = labels[mask]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= v):
            raise ValueError(
                f"{loss.name}: labels of masked-in tokens must be in [0, {v}), got range "
                f"[{int(used.min())}, {int(used.max())}]"
            )
    return mask
