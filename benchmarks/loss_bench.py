"""Full-logits loss vs the chunked `fused` path: peak extra memory and median forward+backward time.

The full-logits path is what a straightforward implementation does: student and teacher logits
materialised as [N, V], float32 softmaxes, autograd through all of it (`loss(h_s @ W_s.T, h_t @ W_t.T)`).
Each (path, loss, size) runs in a fresh subprocess so peak memory is its own:
  - CPU: peak resident set size (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the
    step, i.e. everything the step allocates, including the gradients of h_s and W_s (both paths make them),
    with glibc's mmap threshold fixed so freed tensors leave the RSS;
  - GPU: torch.cuda.max_memory_allocated minus the allocation before the step.
Time is the median of --reps steps after the measured one (CUDA events on a GPU).
On a GPU the table also gives:
  - the matmul floor: 6 N H_s V + 2 N H_t V FLOP (student lm_head forward + two backward matmuls, teacher
    lm_head forward) at the bf16 matmul rate measured here (8192^3, or --matmul-tflops), and fused / floor;
  - Liger-Kernel's Triton `LigerFusedLinearJSD` with jsd_beta = 0 (its forward KL, KL(teacher || student))
    in the same kind of child process, and our time / Liger's (needs liger-kernel; skipped with a message
    when it is missing or on a CPU, where its Triton kernels cannot run).
A child that fails (e.g. out of memory) is reported as such and the table goes on. Run:
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


def run_one(path: str, loss_name: str, n: int, h_s: int, h_t: int, vocab: int, device: str, dtype: str, reps: int,
            chunk_size=None):
    import torch

    from taid_vlm.losses import OnlineTeacher, build_loss

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    dev = torch.device(device)
    hs = (torch.randn(n, h_s, device=dev) * 0.5).to(dt).requires_grad_()
    ws = (torch.randn(vocab, h_s, device=dev) * 0.05).to(dt).requires_grad_()
    ht = (torch.randn(n, h_t, device=dev) * 0.5).to(dt)
    wt = (torch.randn(vocab, h_t, device=dev) * 0.05).to(dt)
    mask = torch.ones(n, dtype=torch.bool, device=dev)
    loss = liger_fkl() if path == "liger" else build_loss(loss_name)

    def step(hs=hs, ws=ws, ht=ht, wt=wt, mask=mask):
        if path == "liger":
            value = loss(hs, ws, ht, wt, None)
        elif path == "full":
            value = loss(hs @ ws.T, ht @ wt.T, mask)
        else:
            value = loss.fused(hs, ws, OnlineTeacher(ht, wt), mask, chunk_size=chunk_size)
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
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            value = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            value = step()
            times.append(time.perf_counter() - t0)
        hs.grad = ws.grad = None
    return {"peak_bytes": peak, "median_s": statistics.median(times), "value": float(value)}


def liger_fkl():
    """Liger-Kernel's fused linear JSD at beta = 0, i.e. forward KL(teacher || student), mean over tokens."""
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    return LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)


def liger_skip_reason(device: str):
    """Why Liger's Triton path cannot run here, or None."""
    if not device.startswith("cuda"):
        return "liger: skipped (its Triton kernels need a CUDA device)"
    try:
        liger_fkl()
    except Exception as e:  # ImportError, or a Triton/torch mismatch
        return f"liger: skipped ({type(e).__name__}: {e})"
    return None


def measure_matmul_tflops(device: str, size: int = 8192, reps: int = 10) -> float:
    """bf16 [size]^3 matmul rate: mean of `reps` products after 3 warm-ups, CUDA events."""
    import torch

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / reps
    del a, b
    torch.cuda.empty_cache()
    return 2 * size**3 / seconds / 1e12


# --kernels: which closed form the fused path runs on a GPU (losses/closed_form.py picks by this variable)
KERNEL_ENV = {"torch": {"TAID_VLM_TRITON": "0"}, "triton": {"TAID_VLM_TRITON": "1"}}


def run_child(spec: dict, timeout_s=None, kernel: str = "torch"):
    """One (path, loss, size) in a fresh process; None (and the reason printed) if it fails or times out."""
    what = f"  {spec['path']} {spec['loss_name']} N={spec['n']} H={spec['h_s']}"
    try:
        proc = subprocess.run([sys.executable, __file__, "--_child", json.dumps(spec)],
                              capture_output=True, text=True, env={**CHILD_ENV, **KERNEL_ENV[kernel]}, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"{what}: stopped after --child-timeout {timeout_s:.0f} s", flush=True)
        return None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        print(f"{what}: failed ({tail})", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _fmt(x, spec, scale=1.0):
    """x * scale formatted as `spec` ("9.1f"), or "-" at the same width where x is missing."""
    return "-".rjust(int(spec.split(".")[0])) if x is None else format(x * scale, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--losses", default="taid,fkl,rkl")
    ap.add_argument("--sizes", default="2048x1536x1536,1024x896x1536", help="NxH_studentxH_teacher, comma-separated")
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--matmul-tflops", type=float, help="bf16 matmul rate for the floor (GPU: measured if not given)")
    ap.add_argument("--chunk-sizes", default="auto",
                    help="fused path's token chunk sizes, comma-separated (auto: the library default); a row each")
    ap.add_argument("--kernels", default="torch",
                    help="fused path's closed form, comma-separated: torch (the default), triton (the fused Triton "
                         "kernel, TAID_VLM_TRITON=1; GPU only); a row each")
    ap.add_argument("--child-timeout", type=float, help="seconds one (path, loss, size) process may take")
    ap.add_argument("--no-liger", action="store_true", help="leave Liger-Kernel's fused JSD out")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._child:
        spec = json.loads(args._child)
        print(json.dumps(run_one(**spec)))
        return

    import torch

    on_gpu = args.device.startswith("cuda")
    tflops = args.matmul_tflops or (measure_matmul_tflops(args.device) if on_gpu else None)
    liger_skip = liger_skip_reason(args.device) if not args.no_liger else "liger: skipped (--no-liger)"
    print(f"loss_bench: V={args.vocab} device={args.device} dtype={args.dtype} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} reps={args.reps}"
          + (f" bf16 matmul={tflops:.0f} TFLOP/s" if tflops else ""), flush=True)
    if liger_skip:
        print(liger_skip, flush=True)
    header = (f"{'loss':<6} {'chunk':>10} {'N':>6} {'H_s':>5} {'H_t':>5} | {'full MiB':>9} {'fused MiB':>9} {'mem %':>6} | "
              f"{'full ms':>9} {'fused ms':>9} {'speedup':>7} | {'floor ms':>8} {'/floor':>6} | "
              f"{'liger MiB':>9} {'liger ms':>9} {'/liger':>6} | {'|dvalue|':>9}")
    print(header)
    print("-" * len(header), flush=True)
    rows = []
    for size in args.sizes.split(","):
        n, h_s, h_t = (int(x) for x in size.split("x"))
        base = dict(n=n, h_s=h_s, h_t=h_t, vocab=args.vocab, device=args.device, dtype=args.dtype, reps=args.reps)
        child = lambda **spec: run_child(dict(base, **spec), args.child_timeout)  # noqa: E731
        liger = None if liger_skip else child(path="liger", loss_name="fkl")
        for loss_name in args.losses.split(","):
            full = child(path="full", loss_name=loss_name)
            for chunk in args.chunk_sizes.split(","):
                chunk_size = None if chunk == "auto" else int(chunk)
                for kernel in args.kernels.split(","):
                    fused = run_child(dict(base, path="fused", loss_name=loss_name, chunk_size=chunk_size),
                                      args.child_timeout, kernel)
                    label = chunk if kernel == "torch" else f"{chunk}/{kernel}"
                    rows.append(table_row(loss_name, label, base, full, fused, liger, tflops))
                if args.json:  # after every row: a run stopped part-way keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)


def table_row(loss_name, chunk, base, full, fused, liger, tflops) -> dict:
    """One line of the table (printed) and its JSON record; None where a child failed or was skipped."""
    n, h_s, h_t, vocab = base["n"], base["h_s"], base["h_t"], base["vocab"]
    get = lambda r, k: None if r is None else r[k]  # noqa: E731
    floor_s = (6 * n * h_s * vocab + 2 * n * h_t * vocab) / (tflops * 1e12) if tflops else None
    row = dict(loss=loss_name, chunk_size=chunk, **base,
               full_mib=_ratio(get(full, "peak_bytes"), 2**20), fused_mib=_ratio(get(fused, "peak_bytes"), 2**20),
               mem_ratio=_ratio(get(fused, "peak_bytes"), get(full, "peak_bytes")),
               full_s=get(full, "median_s"), fused_s=get(fused, "median_s"),
               speedup=_ratio(get(full, "median_s"), get(fused, "median_s")),
               matmul_tflops=tflops, floor_s=floor_s, fused_over_floor=_ratio(get(fused, "median_s"), floor_s),
               liger_mib=_ratio(get(liger, "peak_bytes"), 2**20), liger_s=get(liger, "median_s"),
               fused_over_liger=_ratio(get(fused, "median_s"), get(liger, "median_s")),
               liger_value=get(liger, "value"),
               value_diff=None if full is None or fused is None else abs(full["value"] - fused["value"]))
    print(f"{loss_name:<6} {chunk:>10} {n:>6} {h_s:>5} {h_t:>5} | {_fmt(row['full_mib'], '9.0f')} {_fmt(row['fused_mib'], '9.0f')} "
          f"{_fmt(row['mem_ratio'], '5.1f', 100)}% | {_fmt(row['full_s'], '9.1f', 1e3)} {_fmt(row['fused_s'], '9.1f', 1e3)} "
          f"{_fmt(row['speedup'], '6.2f')}x | {_fmt(floor_s, '8.1f', 1e3)} {_fmt(row['fused_over_floor'], '5.2f')}x | "
          f"{_fmt(row['liger_mib'], '9.0f')} {_fmt(row['liger_s'], '9.1f', 1e3)} {_fmt(row['fused_over_liger'], '5.2f')}x | "
          f"{_fmt(row['value_diff'], '9.2e')}", flush=True)
    return row


if __name__ == "__main__":
    main()
