"""Per-worker data throughput: decode (tar read + PIL) + transform + tokenize (chat template, labels).

  python benchmarks/data_bench.py [--n 200] [--sizes 224 448]
  python benchmarks/data_bench.py --qwen [--n 100] [--rounds 3]   # Qwen2.5-VL, default resolution, 1024x768 JPEGs
  python benchmarks/data_bench.py --qwen --photos DIR              # the same on your photos, made 1024x768

Writes a shard of synthetic-photo JPEGs (noise + gradients, quality 90) per size, then runs the exact
per-sample work of a DataLoader worker (read_shard -> decode_sample -> Renderer for ONE model with a
CLIP-style transform: resize, center crop, to tensor, normalize) in this single process, and prints
samples/s. One process = one worker; total throughput scales with workers until the cores run out.
--qwen: the same per-sample work with Qwen2.5-VL's image processor, once through the processor itself and
once through the adapter's fast path (same tensors), with the process CPU time of each stage per sample.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import webdataset as wds  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from taid_vlm.data import Renderer, decode_sample, read_shard  # noqa: E402
from taid_vlm.data.skips import SkipCounter  # noqa: E402
from taid_vlm.spec import InputSpec  # noqa: E402
from taid_vlm.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer  # noqa: E402


def photo(size: int, rng: np.random.Generator, width: int = 0) -> bytes:
    width = width or size
    y, x = np.mgrid[0:size, 0:width].astype(np.float32) / max(size, width)
    base = np.stack([x, y, 1 - x * y], -1) * 200
    img = np.clip(base + rng.normal(0, 25, (size, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def real_photos(folder: Path, size: int, width: int) -> list:
    """Every JPEG/PNG in ``folder`` as a width x size JPEG (quality 90): centre-cropped to that aspect ratio,
    then resized with PIL's bicubic (photos smaller than that are upscaled, which makes them smoother, i.e.
    cheaper to decode, than a native photo of that size)."""
    from PIL import ImageOps

    if not folder.is_dir():
        raise SystemExit(f"--photos {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    out = []
    for f in files:
        try:
            img = ImageOps.fit(Image.open(f).convert("RGB"), (width, size), Image.BICUBIC)
        except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise SystemExit(f"--photos: {f} is not a readable image ({e})") from None
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    if not out:
        raise SystemExit(f"--photos {folder}: no .jpg/.jpeg/.png files there")
    return out


def make_shard(path: str, size: int, n: int, width: int = 0, photos: list = None) -> None:
    """n samples; the JPEGs are synthetic (noise + gradients) or cycle through ``photos``."""
    rng = np.random.default_rng(0)
    with wds.TarWriter(path, mtime=0) as w:
        for i in range(n):
            conv = [{"from": "human", "value": "<image>\nDescribe the image in detail."},
                    {"from": "gpt", "value": "A photo with a smooth gradient from blue to red, some noise, "
                                             "and no clear object in the center or the corners."}]
            jpg = photos[i % len(photos)] if photos else photo(size, rng, width)
            w.write({"__key__": f"s{i:06d}", "jpg": jpg, "json": json.dumps({"conversations": conv})})


def clip_spec(size: int, tok) -> InputSpec:
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize([0.481, 0.458, 0.408], [0.269, 0.261, 0.276])])
    return InputSpec(tok, tf, tokens_per_image=(size // 14) ** 2 // 4, image_token=IMAGE_TOKEN,
                     image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN))


def qwen_spec(fast: bool = True) -> InputSpec:
    """Qwen2.5-VL's processor at its default resolution (up to 1280 merged 28x28 patches): the adapter's
    fast path (``image_inputs_for``) or the processor itself (``ProcessorImageInputs``, the reference)."""
    from types import SimpleNamespace

    from taid_vlm.models.hf_families import FAMILIES
    from taid_vlm.models.hf_image_processing import ProcessorImageInputs
    from taid_vlm.models.hf_qwen_image_inputs import image_inputs_for
    from taid_vlm.models.tiny_family_tokenizers import build_family_tokenizer

    tok = build_family_tokenizer("qwen2_5_vl")
    geometry = SimpleNamespace(vision_config=SimpleNamespace(patch_size=14, temporal_patch_size=2, spatial_merge_size=2))
    fam = FAMILIES["qwen2_5_vl"]
    proc = fam.build_processor(tok, geometry, {"processor": {"chat_template": tok.chat_template}})
    inputs = (image_inputs_for if fast else ProcessorImageInputs)(proc, fam.image_prompt)
    return InputSpec(tok, image_token=proc.image_token, image_token_id=tok.convert_tokens_to_ids(proc.image_token),
                     image_processor=inputs)


class CpuClock:
    """Process CPU time spent inside a callable (the load-independent cost of a stage)."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args):
        t0 = time.process_time()
        try:
            return self.fn(*args)
        finally:
            self.seconds += time.process_time() - t0


def qwen_stages(path: str, fast: bool) -> dict:
    """One pass over the shard: CPU ms per sample of each stage, and wall samples/s."""
    import torch

    torch.set_num_threads(1)
    spec = qwen_spec(fast)
    images = CpuClock(spec.image_processor)
    r = Renderer(replace(spec, image_processor=images), 8192)
    decode, render, skips = CpuClock(decode_sample), CpuClock(r), SkipCounter()
    render(decode(next(read_shard(path, skips))))  # warm-up
    images.seconds = decode.seconds = render.seconds = 0.0
    n, cpu0, t0 = 0, time.process_time(), time.perf_counter()
    for raw in read_shard(path, skips):
        render(decode(raw))
        n += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ms = {"read": cpu - decode.seconds - render.seconds, "decode": decode.seconds, "images": images.seconds,
          "render": render.seconds - images.seconds, "total": cpu}
    return {**{k: 1e3 * v / n for k, v in ms.items()}, "rate": n / wall}


def lap_ms(chain, reps: int = 25, warmup: int = 10) -> list:
    """Median process CPU ms of each step of ``chain`` (a list of functions, each taking the previous result),
    the steps run one after the other as in the real call, then the whole chain again."""
    laps = []
    for _ in range(warmup + reps):
        value, t0, times = None, time.process_time(), []
        for step in chain:
            value = step(value)
            times.append(time.process_time() - t0)
            t0 = time.process_time()
        laps.append(times)
        value = None  # nothing big survives into the next round (it would change what the allocator reuses)
    return [1e3 * statistics.median(lap[k] for lap in laps[warmup:]) for k in range(len(chain))]


def in_fresh_process(fn, *args):
    """Run ``fn(*args)`` in a new single-threaded process: each path's timing starts from a clean allocator
    (a pass of one path leaves glibc's mmap/trim thresholds where they slow the other's big tensors)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def image_step_laps(path: str, fast: bool) -> list:
    """CPU ms of each step inside "image inputs" for one decoded photo (processor: its own methods in its
    order; fast path: its steps), and the whole call last."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # a read-only view
    inputs = qwen_spec(fast).image_processor
    ip = inputs.processor.image_processor
    image = decode_sample(next(read_shard(path, SkipCounter()))).images[0]
    p, m, t = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    if fast:
        return lap_ms([lambda _: torch.from_numpy(np.asarray(image)).permute(2, 0, 1).unsqueeze(0),
                       lambda x: ip.resize(x, size=ip.size, resample=ip.resample, factor=p * m),
                       lambda x: x,  # normalised inside patchify
                       lambda x: inputs.patchify(x)]) + lap_ms([lambda _: inputs([image])])
    return lap_ms([lambda _: ip.process_image(image, do_convert_rgb=True),
                   lambda chw: ip.resize(chw[None], size=ip.size, resample=ip.resample, factor=p * m),
                   lambda x: ip.rescale_and_normalize(x, True, ip.rescale_factor, True, ip.image_mean, ip.image_std),
                   lambda x: ip.patchify(x, p, m, t)]) + lap_ms([lambda _: inputs([image])])


def qwen_image_breakdown(path: str) -> None:
    """Inside "image inputs": the processor's steps vs the fast path's; "the rest" = whole call - steps."""
    theirs, ours = (in_fresh_process(image_step_laps, path, fast) for fast in (False, True))
    names = ["PIL -> uint8 tensor", "resize (bicubic, antialias)", "rescale + normalise",
             "patchify (x2 temporal); fast path: + normalise", "the rest (prompt expansion + tokenizing, checks)"]
    print("\n| step (one 1024x768 photo; CPU ms, median of 25) | processor | fast path |")
    print("|---|---:|---:|")
    for k, name in enumerate(names[:4]):
        print(f"| {name} | {theirs[k]:.1f} | {'-' if k == 2 else f'{ours[k]:.1f}'} |")
    print(f"| {names[4]} | {theirs[4] - sum(theirs[:4]):.1f} | {ours[4] - sum(ours[:4]):.1f} |")
    print(f"| image inputs, whole call | {theirs[4]:.1f} | {ours[4]:.1f} |")


def qwen_table(path: str, rounds: int) -> None:
    runs = {"processor (reference)": [], "fast path": []}
    for _ in range(rounds):  # alternated: both paths see the same machine load
        for name in runs:
            runs[name].append(in_fresh_process(qwen_stages, path, name == "fast path"))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; CPU ms per sample (median of "
          f"{rounds} rounds); samples/s per worker = wall clock")
    print("| image inputs | tar read | JPEG + JSON decode | image inputs | chat template + spans | total CPU ms | "
          "1000 / total | samples/s per worker |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    for name, m in med.items():
        print(f"| {name} | {m['read']:.1f} | {m['decode']:.1f} | {m['images']:.1f} | {m['render']:.1f} | "
              f"{m['total']:.1f} | {1e3 / m['total']:.1f} | {m['rate']:.1f} |")
    ref, fast = med.values()
    print(f"fast / processor: image inputs {ref['images'] / fast['images']:.2f}x faster, whole sample "
          f"{ref['total'] / fast['total']:.2f}x less CPU")


def bench(path: str, spec: InputSpec) -> tuple:
    r = Renderer(spec, 8192)
    skips = SkipCounter()
    for raw in read_shard(path, skips, start=0):  # warm-up pass (page cache, template compile)
        r(decode_sample(raw))
        break
    t0 = time.perf_counter()
    n = 0
    for raw in read_shard(path, skips):
        r(decode_sample(raw))
        n += 1
    dt = time.perf_counter() - t0
    return n / dt, os.path.getsize(path) / n / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    ap.add_argument("--qwen", action="store_true", help="Qwen2.5-VL processor on 1024x768 JPEGs instead")
    ap.add_argument("--rounds", type=int, default=3, help="--qwen: alternated passes per path (median)")
    ap.add_argument("--photos", type=Path, help="--qwen: a folder of photos (made 1024x768) instead of synthetic JPEGs")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    if a.qwen:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "qwen.tar")
            photos = real_photos(a.photos, 768, 1024) if a.photos else None
            make_shard(path, 768, a.n, width=1024, photos=photos)
            if photos:
                print(f"{len(photos)} photos from {a.photos}, {sum(map(len, photos)) / len(photos) / 1024:.0f} KiB each "
                      f"on average as 1024x768 JPEGs (quality 90)")
            spec = qwen_spec()
            sample = next(iter(read_shard(path, SkipCounter())))
            r = Renderer(spec, 8192)(decode_sample(sample))
            grid = r.image_inputs["image_grid_thw"][0].tolist()
            print(f"1024x768 JPEG {os.path.getsize(path) / a.n / 1024:.0f} KiB, Qwen2.5-VL grid {grid}, "
                  f"{len(r)} tokens per sample")
            qwen_table(path, a.rounds)
            qwen_image_breakdown(path)
        return 0
    tok = build_tiny_tokenizer()
    print(f"| image px | jpeg KiB | samples/s per worker (decode + transform + tokenize) |")
    print(f"|---------:|---------:|------------------------------------------------------:|")
    with tempfile.TemporaryDirectory() as d:
        for size in a.sizes:
            path = os.path.join(d, f"{size}.tar")
            make_shard(path, size, a.n)
            rate, kib = bench(path, clip_spec(size, tok))
            print(f"| {size:8d} | {kib:8.1f} | {rate:53.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
