"""The replay buffer of generated completions (the official TAID code's `ReplayBuffer`: a deque of the
last `capacity` completions, sampled without replacement), with a seeded RNG instead of the process-wide
`random`, and a state for the checkpoint.

An entry is a plain dict: ``{"key", "index", "student": prompt ids, "teacher": prompt ids, "completion": ids}``
(the teacher's own rendering of the prompt, the completion shared: the vocabularies are)."""

from __future__ import annotations

import random
from collections import deque
from typing import Iterable


class ReplayBuffer:
    def __init__(self, capacity: int = 1000):
        self.capacity = int(capacity)
        self.entries: deque = deque(maxlen=self.capacity)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def full(self) -> bool:
        return len(self.entries) >= self.capacity

    def push(self, entries: Iterable[dict]) -> None:
        """Oldest entries fall out once `capacity` is reached."""
        self.entries.extend(entries)

    def sample(self, k: int, rng: random.Random) -> list[dict]:
        """`k` distinct entries, as `rng.sample(buffer, k)` picks them (the official `random.sample`)."""
        return rng.sample(list(self.entries), k)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "entries": list(self.entries)}

    def load_state_dict(self, state: dict) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"sampling.capacity: the checkpoint's replay buffer holds {state['capacity']} "
                             f"completions, this config {self.capacity}; resume with the same capacity")
        self.entries = deque(state["entries"], maxlen=self.capacity)
