"""Which micro-batches of a step train on generated text: the official TAID code's `SampleGenerator`
(src/sampler.py) for `mixed` and `adaptive`, TRL GKD's `training_step` for `on_policy`.

The official code draws `np.random.uniform` per micro-batch on each GPU, and TRL `random.random()`; here
the draw of global micro-batch ``g`` (rank * grad_accum + m: the same samples on any world size,
global_order.py) at optimizer step ``k`` comes from an RNG seeded by (seed, k, g), so every layout and a
resumed run take the same decisions.

- mixed: u < mixed_alpha -> generate from the student, push to the buffer, train on a buffer sample.
- adaptive: with threshold T (0 at the start, + threshold_step whenever the validation loss is not
  below the last loss that raised it, at most 1) and the fresh share F = T * (1 - k/K) (replay_ratio
  decreasing; T/2 constant; T*k/K increasing): u < F, or u < T while the buffer is not full ->
  generate, push, train on the fresh completions; else u < T -> train on a buffer sample.
- on_policy: u < lmbda -> the student generates; else with seq_kd the teacher generates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from taid_vlm.config import SamplingConfig

STUDENT, TEACHER = "student", "teacher"


@dataclass(frozen=True)
class Decision:
    generate: Optional[str] = None  # who generates: "student", "teacher", or None
    push: bool = False              # the fresh completions go to the replay buffer
    replay: bool = False            # the micro-batch becomes a sample from the buffer

    @property
    def fixed(self) -> bool:
        return self.generate is None and not self.replay


def draw(seed: int, step: int, micro: int) -> float:
    """The uniform number of global micro-batch `micro` at optimizer step `step` (0-based)."""
    return random.Random(f"sampling:{seed}:{step}:{micro}").random()


class SamplingPolicy:
    def __init__(self, cfg: SamplingConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.threshold = 0.0            # adaptive: the official `adaptive_threshold`
        self.prev_loss: Optional[float] = None

    def fresh_share(self, step: int, total_steps: int) -> float:
        """adaptive: the official `samp_threshold` (share of micro-batches generated fresh)."""
        ratio = self.cfg.replay_ratio
        if ratio == "constant":
            return self.threshold * 0.5
        progress = step / total_steps
        return self.threshold * (progress if ratio == "increasing" else 1 - progress)

    def decide(self, step: int, total_steps: int, micro: int, buffer_full: bool) -> Decision:
        c, u = self.cfg, draw(self.seed, step, micro)
        if c.mode == "mixed":
            return Decision(STUDENT, push=True, replay=True) if u < c.mixed_alpha else Decision()
        if c.mode == "adaptive":
            if u < self.fresh_share(step, total_steps) or (u < self.threshold and not buffer_full):
                return Decision(STUDENT, push=True)
            return Decision(replay=True) if u < self.threshold else Decision()
        if c.mode == "on_policy":
            if u < c.lmbda:
                return Decision(STUDENT)
            return Decision(TEACHER) if c.seq_kd else Decision()
        return Decision()

    def after_eval(self, loss: float) -> None:
        """adaptive: the official `update` (loss_eps 0): the first loss is recorded; a loss at or above the
        recorded one raises the threshold by threshold_step (at most 1) and becomes the recorded one."""
        if self.cfg.mode != "adaptive":
            return
        if self.prev_loss is None:
            self.prev_loss = loss
        elif loss >= self.prev_loss:
            self.threshold = min(self.threshold + self.cfg.threshold_step, 1.0)
            self.prev_loss = loss

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict) -> None:
        self.threshold, self.prev_loss = float(state["threshold"]), state["prev_loss"]
