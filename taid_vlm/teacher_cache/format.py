"""One companion record per data sample: the teacher's top-k at each of its supervised text tokens.

A companion shard is a tar with the same ``__key__``s, in the same order, as its data shard, one member
per raw data sample:

- ``KEY.topk``: a 16-byte header ``<4s B B H I I>`` = (b"TKC1", version 1, log-prob dtype code, 0, k,
  n) followed by, for the n supervised tokens of the teacher's rendering (its k-th supervised position =
  the k-th entry):
      targets  int32   [n]      the supervised token ids (for alignment and integrity checks)
      ids      int32   [n, k]   the teacher's top-k token ids, by decreasing probability
      logprobs float16 [n, k]   their log-probabilities (float32 with --logprob-dtype float32)
      log_tail float32 [n]      log of the probability mass outside the top-k (-inf when k = V)
  = 6k + 8 bytes per supervised token with float16 (392 at k = 64), plus the tar member overhead
  (a 512-byte header and padding to 512 bytes) per sample.
- ``KEY.topk`` of a hidden-state cache (``--format hidden``; the same member name, so the data pipeline
  pairs it the same way; the magic tells the kinds apart): header ``<4s B B H I I>`` = (b"THC1", version 1,
  dtype code, 0, H, n), then
      targets  int32   [n]      the supervised token ids
      (scale   float32 [n]      int8 only: hidden = values * scale, scale = max |h| / 127 per token)
      hidden   dtype   [n, H]   the teacher's final hidden state (after its final norm) at those tokens,
                                float16 / float32 / bfloat16 (stored as its raw 16 bits) / int8
  = 4 + H * itemsize bytes per supervised token (int8: 8 + H); the teacher's lm_head [V, H] is stored once per cache
  (lm_head.py). The teacher's logits are then rebuilt exactly as the online teacher computes them.
- ``KEY.skip``: the sample could not be rendered for the teacher (utf-8 reason, e.g. ``corrupt_image``);
  training skips it under that reason. It keeps the companion one-to-one with the data shard.

Compression (``cache_teacher --compress``): ``stream`` (the default) gzips the whole companion tar;
``records`` gzips each record alone inside a plain tar, which stays seekable (the data pipeline reads such
records by byte range, data/sample_reader.py); ``none`` stores them plain. ``decode`` takes a gzipped record
as it is (by the gzip magic, which no record header starts with).
"""

from __future__ import annotations

import gzip
import struct
from typing import NamedTuple, Optional

import numpy as np

from taid_vlm.data.shard_io import GZIP_MAGIC

MAGIC = b"TKC1"
HIDDEN_MAGIC = b"THC1"
VERSION = 1
HEADER = struct.Struct("<4sBBHII")
TOPK_FIELD = "topk"
HIDDEN_FIELD = TOPK_FIELD  # the pipeline reads one member per sample, whatever the cache kind
SKIP_FIELD = "skip"
DTYPES = {1: np.float16, 2: np.float32}
DTYPE_CODES = {"float16": 1, "float32": 2}
HIDDEN_DTYPE_CODES = {"float16": 1, "float32": 2, "bfloat16": 3, "int8": 4}
_HIDDEN_NUMPY = {1: "<f2", 2: "<f4", 3: "<u2", 4: "i1"}  # bfloat16 travels as its raw 16 bits


class CacheRecordError(ValueError):
    """A companion record that does not parse (wrong magic or version, wrong length)."""


class TopKRecord(NamedTuple):
    targets: np.ndarray   # int32 [n]
    ids: np.ndarray       # int32 [n, k]
    logprobs: np.ndarray  # float16 / float32 [n, k]
    log_tail: np.ndarray  # float32 [n]

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def select(self, rows) -> "TopKRecord":
        return TopKRecord(self.targets[rows], self.ids[rows], self.logprobs[rows], self.log_tail[rows])


class HiddenRecord(NamedTuple):
    targets: np.ndarray  # int32 [n]
    hidden: np.ndarray   # [n, H]: float16 / float32 / int8, or uint16 holding bfloat16 bits
    dtype: str           # "float16" | "float32" | "bfloat16" | "int8"
    scale: Optional[np.ndarray] = None  # float32 [n]: int8 only, hidden = values * scale

    def select(self, rows) -> "HiddenRecord":
        return HiddenRecord(self.targets[rows], self.hidden[rows], self.dtype,
                            None if self.scale is None else self.scale[rows])


def hidden_tensor(hidden: np.ndarray, dtype: str, scale: Optional[np.ndarray] = None):
    """Stored hidden states (HiddenRecord.hidden, or several concatenated) as a torch tensor: of ``dtype``,
    or float32 for int8 (values times the per-token ``scale``)."""
    import torch

    t = torch.from_numpy(np.array(hidden, copy=True))
    if dtype == "int8":
        return t.float() * torch.from_numpy(np.array(scale, dtype=np.float32)).unsqueeze(1)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def empty_hidden_record(hidden_size: int, dtype: str) -> HiddenRecord:
    numpy_dtype = _HIDDEN_NUMPY[HIDDEN_DTYPE_CODES[dtype]]
    return HiddenRecord(np.zeros(0, np.int32), np.zeros((0, hidden_size), numpy_dtype), dtype,
                        np.zeros(0, np.float32) if dtype == "int8" else None)


def hidden_bytes_per_token(hidden_size: int, dtype: str) -> int:
    scale = 4 if dtype == "int8" else 0
    return 4 + scale + hidden_size * np.dtype(_HIDDEN_NUMPY[HIDDEN_DTYPE_CODES[dtype]]).itemsize


def _int8_with_scale(h):
    """Symmetric int8 per token: values in [-127, 127], scale = max |h| / 127 (float32)."""
    import torch

    h = h.detach().float().cpu()
    scale = (h.abs().amax(-1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    values = (h / scale.unsqueeze(1)).round_().clamp_(-127, 127).to(torch.int8)
    return values.numpy(), scale.numpy().astype("<f4")


def encode_hidden(targets, hidden, dtype: str) -> bytes:
    """``hidden``: a torch tensor [n, H] (cast to ``dtype`` here; int8: quantised per token)."""
    import torch

    n, h = hidden.shape
    targets = np.ascontiguousarray(targets, dtype="<i4")
    if targets.shape != (n,):
        raise ValueError(f"encode_hidden: targets {targets.shape} do not fit hidden {(n, h)}")
    scale = b""
    if dtype == "int8":
        raw, scales = _int8_with_scale(hidden)
        scale = scales.tobytes()
    else:
        t = hidden.detach().to("cpu", getattr(torch, dtype)).contiguous()
        raw = (t.view(torch.int16) if dtype == "bfloat16" else t).numpy()
    data = np.ascontiguousarray(raw).astype(raw.dtype.newbyteorder("<"), copy=False).tobytes()
    return HEADER.pack(HIDDEN_MAGIC, VERSION, HIDDEN_DTYPE_CODES[dtype], 0, h, n) + targets.tobytes() + scale + data


def _decode_hidden(data: bytes) -> HiddenRecord:
    _, version, code, _, h, n = HEADER.unpack_from(data)
    if version != VERSION or code not in _HIDDEN_NUMPY:
        raise CacheRecordError(f"not a version-{VERSION} hidden-state record (version {version}, dtype {code})")
    name = {c: d for d, c in HIDDEN_DTYPE_CODES.items()}[code]
    want = HEADER.size + n * hidden_bytes_per_token(h, name)
    if len(data) != want:
        raise CacheRecordError(f"record has {len(data)} bytes, its header (n={n}, H={h}) says {want}")
    at = HEADER.size + 4 * n
    targets = np.frombuffer(data, dtype="<i4", count=n, offset=HEADER.size)
    scale = None
    if name == "int8":
        scale, at = np.frombuffer(data, dtype="<f4", count=n, offset=at), at + 4 * n
    hidden = np.frombuffer(data, dtype=_HIDDEN_NUMPY[code], count=n * h, offset=at).reshape(n, h)
    return HiddenRecord(targets, hidden, name, scale)


def bytes_per_token(k: int, logprob_dtype: str = "float16") -> int:
    """Payload bytes per supervised token (without the per-sample header and tar overhead)."""
    return 4 + 4 * k + np.dtype(DTYPES[DTYPE_CODES[logprob_dtype]]).itemsize * k + 4


def encode(targets, ids, logprobs, log_tail, logprob_dtype: str = "float16") -> bytes:
    n, k = ids.shape
    dt = DTYPES[DTYPE_CODES[logprob_dtype]]
    parts = [np.ascontiguousarray(targets, dtype="<i4"), np.ascontiguousarray(ids, dtype="<i4"),
             np.ascontiguousarray(logprobs, dtype=np.dtype(dt).newbyteorder("<")),
             np.ascontiguousarray(log_tail, dtype="<f4")]
    if parts[0].shape != (n,) or parts[2].shape != (n, k) or parts[3].shape != (n,):
        raise ValueError(f"encode: shapes targets {parts[0].shape}, ids {(n, k)}, logprobs {parts[2].shape}, "
                         f"log_tail {parts[3].shape} do not fit together")
    return HEADER.pack(MAGIC, VERSION, DTYPE_CODES[logprob_dtype], 0, k, n) + b"".join(p.tobytes() for p in parts)


def compress_record(record: bytes) -> bytes:
    """One record gzipped on its own (``--compress records``; level 1, no timestamp: the same bytes each run)."""
    return gzip.compress(record, compresslevel=1, mtime=0)


def decode(data: bytes):
    """A top-k record (TopKRecord) or a hidden-state record (HiddenRecord), by its magic; gunzipped first
    when it is a gzipped record."""
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise CacheRecordError(f"gzipped record cannot be decompressed ({e})") from None
    if len(data) < HEADER.size:
        raise CacheRecordError(f"record of {len(data)} bytes is shorter than its header")
    magic, version, code, _, k, n = HEADER.unpack_from(data)
    if magic == HIDDEN_MAGIC:
        return _decode_hidden(data)
    if magic != MAGIC or version != VERSION or code not in DTYPES:
        raise CacheRecordError(f"not a version-{VERSION} top-k record (magic {magic!r}, version {version}, dtype {code})")
    size = np.dtype(DTYPES[code]).itemsize
    want = HEADER.size + n * (4 + 4 * k + size * k + 4)
    if len(data) != want:
        raise CacheRecordError(f"record has {len(data)} bytes, its header (n={n}, k={k}) says {want}")
    buf, at = memoryview(data), HEADER.size

    def take(dtype, count, shape):
        nonlocal at
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=at).reshape(shape)
        at += arr.nbytes
        return arr

    targets = take("<i4", n, (n,))
    ids = take("<i4", n * k, (n, k))
    logprobs = take(np.dtype(DTYPES[code]).newbyteorder("<"), n * k, (n, k))
    log_tail = take("<f4", n, (n,))
    return TopKRecord(targets, ids, logprobs, log_tail)
