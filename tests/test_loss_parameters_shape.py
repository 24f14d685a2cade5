"""Learnable loss parameters (CTKD's temperature) must not be 0-dim: DeepSpeed's engine broadcasts every
parameter through `p.data.view(torch.uint8)`, which fails on a 0-dim tensor (found by `taid-vlm compare
--losses ctkd` on the text bed)."""

import torch

from taid_vlm.losses import LOSS_NAMES, build_loss


def test_no_loss_has_a_zero_dim_parameter():
    for name in LOSS_NAMES:
        for pname, p in build_loss(name).named_parameters():
            assert p.dim() >= 1, f"{name}.{pname} is 0-dim"
            p.data.view(torch.uint8)  # what deepspeed.initialize does to broadcast it
