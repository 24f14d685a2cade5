"""The fused Triton forward-KL / TAID kernel (losses/triton_kl.py) against the torch closed form in float64.

No GPU here: the kernel runs under Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is
imported, hence the subprocess). Its speed is a GPU matter (benchmarks/loss_bench.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECK = textwrap.dedent("""
    import torch
    from taid_vlm.losses.closed_form import forward_kl_and_grad
    from taid_vlm.losses.triton_kl import forward_kl_rows

    torch.manual_seed(0)
    cases = 0
    for v, block in ((1000, 256), (777, 1024), (64, 16)):     # several blocks, a ragged last block, one block
        for w in (0.0, 0.6):                                   # forward KL; TAID at t = 0.4
            for ce in (0.0, 0.5):
                n = 6
                s, t = torch.randn(n, v) * 3, torch.randn(n, v) * 3
                t[0, : min(300, v // 2)] = float("-inf")       # whole blocks the teacher bans
                t[1, 5] = float("-inf")
                s[2] += 80
                t[2] -= 50                                     # far from zero: the online max must hold
                y = torch.randint(0, v, (n,))
                ref_v, ref_g = forward_kl_and_grad(s.double(), t.double(), y, ce, w)
                buf = s.clone()
                got_v, got_g = forward_kl_rows(buf, t.clone(), y, ce, w, block=block)
                assert got_g.data_ptr() == buf.data_ptr()      # the gradient is written over the student logits
                torch.testing.assert_close(got_v.double(), ref_v, rtol=1e-5, atol=5e-5)
                torch.testing.assert_close(got_g.double(), ref_g, rtol=1e-5, atol=1e-5)
                assert torch.isfinite(got_g).all() and torch.isfinite(got_v).all()
                cases += 1
    print("cases", cases)
""")


def test_triton_kernel_matches_the_closed_form():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cases 12" in proc.stdout


def test_cpu_tensors_keep_the_torch_closed_form():
    import torch

    from taid_vlm.losses.closed_form import _use_triton

    x = torch.zeros(2, 8)
    assert not _use_triton(x, x)
