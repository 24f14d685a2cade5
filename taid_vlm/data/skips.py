"""Bad samples: one exception type carrying a reason, and a counter of skips by reason.

A bad sample never stops training. Whoever finds it raises ``SampleError(reason, detail)``; the pipeline
catches it, counts it under ``reason`` (keeping a few example keys), and moves on to the next sample.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional

from ..errors import UserError

# Reasons used by this package (free-form strings are allowed too; these are the documented ones).
CORRUPT_IMAGE = "corrupt_image"  # an image field that PIL cannot decode
MISSING_IMAGE = "missing_image"  # a caption record without an image
MISSING_TEXT = "missing_text"  # no caption / conversation / text, or no assistant answer
BAD_JSON = "bad_json"  # the json field does not parse, or has no known layout
BAD_CONVERSATION = "bad_conversation"  # unknown role, non-string content, ...
MARKER_MISMATCH = "marker_mismatch"  # number of <image> markers != number of images
AMBIGUOUS_IMAGES = "ambiguous_images"  # e.g. both `jpg` and `png` in one sample
IMAGES_IN_TEXT_ONLY = "images_in_text_only"  # an image sample in a text-only stream
TOO_LONG = "too_long"  # after truncation to max_length no supervised token is left
UNALIGNED = "unaligned"  # teacher and student share no supervised token
TRUNCATED_TAR = "truncated_tar"  # a shard ends mid-file (key: the shard path)
TAR_ERROR = "tar_error"  # any other error while reading a shard (key: the shard path)
FETCH_ERROR = "fetch_error"  # a remote shard not fetched after the retries (key: the URL; node_cache.py)

MAX_EXAMPLES = 5


class SampleError(Exception):
    """A sample that must be skipped; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Counts skipped samples by reason and keeps up to ``MAX_EXAMPLES`` example keys per reason."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: Dict[str, List[str]] = {}

    def add(self, reason: str, key: Optional[str] = None, n: int = 1) -> None:
        self.counts[reason] += n
        if key is not None:
            ex = self.examples.setdefault(reason, [])
            if len(ex) < MAX_EXAMPLES and key not in ex:
                ex.append(str(key))

    def merge(self, other: "SkipCounter") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
        for reason, keys in other.examples.items():
            ex = self.examples.setdefault(reason, [])
            for k in keys:
                if len(ex) < MAX_EXAMPLES and k not in ex:
                    ex.append(k)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> Dict[str, int]:
        return dict(sorted(self.counts.items()))

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}

    @classmethod
    def from_state(cls, sd: Optional[dict]) -> "SkipCounter":
        c = cls()
        if sd:
            c.counts.update(sd.get("counts", {}))
            c.examples = {k: list(v) for k, v in sd.get("examples", {}).items()}
        return c

    def summary(self) -> str:
        """One line for logs: ``skipped 3 samples (corrupt_image=2 [k1, k2], bad_json=1 [k9])``."""
        if not self.counts:
            return "skipped 0 samples"
        parts = [f"{r}={n} [{', '.join(self.examples.get(r, []))}]" for r, n in sorted(self.counts.items())]
        return f"skipped {self.total} samples ({'; '.join(parts)})"

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


class NoUsableSampleError(UserError, RuntimeError):
    """A full pass over the shards found no sample that can be trained on (the message lists why)."""


def no_usable_message(shards: List[str], skips: SkipCounter) -> str:
    where = shards[0] if len(shards) == 1 else f"{shards[0]} ... {shards[-1]}"
    return (f"no usable sample in a full pass over {len(shards)} shard(s) ({where}): {skips.summary()}; "
            "check the data (data_tools.check_shards) and data.max_length")
