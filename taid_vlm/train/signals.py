"""SIGTERM / SIGINT during training: finish the optimizer step, save a checkpoint, exit with a message.

The first signal only sets a flag; the training loop reads it once per optimizer step (agreed over all
ranks, so every rank stops after the same step), writes a checkpoint and raises `TrainingStopped`.
The CLI turns that into one line and exit code 128 + signal (143 for SIGTERM, 130 for SIGINT): a
scheduler sees a non-zero code and requeues the job, which then continues with `--resume`.
A second signal means "now": the default action is restored and the signal re-raised, so the process
ends at once (nothing is saved; the previous checkpoint stays complete, see checkpoint.py).
Signals within DUPLICATE_WINDOW_S of the first count as the same request: a launcher (deepspeed,
torchrun) forwards the SIGTERM/Ctrl-C its process group already delivered to every rank.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Optional

log = logging.getLogger("taid_vlm.train")

HANDLED = (signal.SIGTERM, signal.SIGINT)
DUPLICATE_WINDOW_S = 2.0


class TrainingStopped(Exception):
    """Raised after the checkpoint of a signalled run is written; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        saved = f"checkpoint {checkpoint} written" if checkpoint else "no checkpoint written"
        super().__init__(f"stopped by {name} after step {step}; {saved}; continue with the same command plus "
                         "--resume (the run's saved settings are kept: steps, overrides)")


class GracefulStop:
    """Context manager: while active, SIGTERM/SIGINT request a stop instead of killing the process."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._first_at = 0.0
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and time.monotonic() - self._first_at < DUPLICATE_WINDOW_S:
            return  # the launcher forwarding the same request
        if self.signum is not None:  # the second signal: exit now, by the signal itself
            for sig, old in self._previous.items():
                signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum, self._first_at = signum, time.monotonic()
        log.warning("%s received: finishing the current optimizer step, then saving a checkpoint and exiting "
                    "(send it again to exit at once, without saving)", signal.Signals(signum).name)

    def install(self) -> "GracefulStop":
        for sig in HANDLED:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread): signals stay as they are
                pass
        return self

    def uninstall(self) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous = {}

    def __enter__(self) -> "GracefulStop":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
