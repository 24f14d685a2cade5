"""Full-logits loss vs the chunked `fused` path: peak extra memory and median forward+backward time.

The full-logits path is what a straightforward implementation does: student and teacher logits
materialised as [N, V], float32 softmaxes, autograd through all of it (`loss(h_s @ W_s.T, h_t @ W_t.T)`).
Each (path, loss, size) runs in a fresh subprocess so peak memory is its own:
  - CPU: peak resident set size (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the
    step, i.e. everything the step allocates, including the gradients of h_s and W_s (both paths make them),
    with glibc's mmap threshold fixed so freed tensors leave the RSS;
  - GPU: torch.cuda.max_memory_allocated minus the allocation before the step.
Time is the median of --reps steps after the measured one. Run:
    .venv/bin/python benchmarks/loss_bench.py                       # CPU defaults (takes ~15 min on 2 cores)
    .venv/bin/python benchmarks/loss_bench.py --device cuda --dtype bfloat16 --sizes 16384x1536x1536
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VOCAB = 151_936  # Qwen2's padded lm_head rows
# A fixed mmap threshold makes glibc return every large freed block to the OS at once (its default
# raises the threshold after the first free and then keeps freed blocks in the heap), so resident
# memory tracks live tensors. Same setting for both paths.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_one(path: str, loss_name: str, n: int, h_s: int, h_t: int, vocab: int, device: str, dtype: str, reps: int):
    import torch

    from taid_vlm.losses import build_loss

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    dev = torch.device(device)
    hs = (torch.randn(n, h_s, device=dev) * 0.5).to(dt).requires_grad_()
    ws = (torch.randn(vocab, h_s, device=dev) * 0.05).to(dt).requires_grad_()
    ht = (torch.randn(n, h_t, device=dev) * 0.5).to(dt)
    wt = (torch.randn(vocab, h_t, device=dev) * 0.05).to(dt)
    mask = torch.ones(n, dtype=torch.bool, device=dev)
    loss = build_loss(loss_name)

    def step(hs=hs, ws=ws, ht=ht, wt=wt, mask=mask):
        if path == "full":
            value = loss(hs @ ws.T, ht @ wt.T, mask)
        else:
            value = loss.fused(hs, ws, ht, wt, mask)
        value.backward()
        return value

    # Warm up on a tiny problem so one-time costs (kernels, thread pools, autograd engine) are not
    # counted as the step's memory.
    tiny = [x[:8, :8].detach().clone().requires_grad_(x.requires_grad) for x in (hs, ws, ht, wt)]
    step(*tiny, mask=mask[:8])

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # Measured step: peak memory on top of inputs (gradients included; they are freed between steps).
    if dev.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        step()
        peak = _rss_kib("VmHWM") * 1024 - before
    hs.grad = ws.grad = None

    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        value = step()
        sync()
        times.append(time.perf_counter() - t0)
        hs.grad = ws.grad = None
    return {"peak_bytes": peak, "median_s": statistics.median(times), "value": float(value)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--losses", default="taid,fkl,rkl")
    ap.add_argument("--sizes", default="2048x1536x1536,1024x896x1536", help="NxH_studentxH_teacher, comma-separated")
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._child:
        spec = json.loads(args._child)
        print(json.dumps(run_one(**spec)))
        return

    import torch

    rows = []
    print(f"loss_bench: V={args.vocab} device={args.device} dtype={args.dtype} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} reps={args.reps}", flush=True)
    header = f"{'loss':<6} {'N':>6} {'H_s':>5} {'H_t':>5} | {'full MiB':>9} {'fused MiB':>9} {'mem %':>6} | {'full s':>8} {'fused s':>8} {'speedup':>7} | {'|dvalue|':>9}"
    print(header)
    print("-" * len(header), flush=True)
    for size in args.sizes.split(","):
        n, h_s, h_t = (int(x) for x in size.split("x"))
        for loss_name in args.losses.split(","):
            result = {}
            for path in ("full", "fused"):
                spec = dict(path=path, loss_name=loss_name, n=n, h_s=h_s, h_t=h_t, vocab=args.vocab,
                            device=args.device, dtype=args.dtype, reps=args.reps)
                out = subprocess.run([sys.executable, __file__, "--_child", json.dumps(spec)],
                                     check=True, capture_output=True, text=True, env=CHILD_ENV)
                result[path] = json.loads(out.stdout.strip().splitlines()[-1])
            full, fused = result["full"], result["fused"]
            row = dict(loss=loss_name, n=n, h_s=h_s, h_t=h_t, vocab=args.vocab, device=args.device, dtype=args.dtype,
                       full_mib=full["peak_bytes"] / 2**20, fused_mib=fused["peak_bytes"] / 2**20,
                       mem_ratio=fused["peak_bytes"] / full["peak_bytes"], full_s=full["median_s"],
                       fused_s=fused["median_s"], speedup=full["median_s"] / fused["median_s"],
                       value_diff=abs(full["value"] - fused["value"]))
            rows.append(row)
            print(f"{loss_name:<6} {n:>6} {h_s:>5} {h_t:>5} | {row['full_mib']:>9.0f} {row['fused_mib']:>9.0f} "
                  f"{100 * row['mem_ratio']:>5.1f}% | {row['full_s']:>8.2f} {row['fused_s']:>8.2f} "
                  f"{row['speedup']:>6.2f}x | {row['value_diff']:>9.2e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
