"""The trainer's AdamW (torch's fused kernel where the device has one) against torch's plain per-parameter
AdamW: the same parameters after a few steps, up to float rounding."""

import torch

from taid_vlm.train.components import fused_adamw


def _run(make_optimizer, steps=4):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(257, 33), (33,), (5, 7)]]
    opt = make_optimizer(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        opt.step()
    return params, opt


def test_fused_adamw_matches_plain_adamw_on_cpu():
    hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    fused, opt = _run(lambda ps: fused_adamw(ps, **hyper))
    plain, _ = _run(lambda ps: torch.optim.AdamW(ps, foreach=False, **hyper))
    assert opt.defaults["fused"] is True  # torch >= 2.4 has the CPU kernel
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # measured: 1-2 ulp of the weights
