"""Progress wherever the output goes: a bar only on a terminal; in a file or a pipe, one line per logged
training step (step, loss, t, tokens/s, ETA) and, for evaluation and cache writing, a line at most
every LINE_INTERVAL_S seconds."""

from __future__ import annotations

import io
import logging

import pytest

from taid_vlm import progress
from taid_vlm.progress import LoopProgress, StepProgress, duration


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (44.6, "45s"), (192, "3m12s"), (3600, "1h00m"), (7500, "2h05m")])
def test_durations_read_like_a_clock(seconds, text):
    assert duration(seconds) == text


def test_a_step_line_per_update_when_not_on_a_terminal(caplog, monkeypatch):
    clock = iter([100.0, 130.0, 190.0])  # start; after 3 of 12 steps (30 s); after the last
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    steps = StepProgress(total=12, start=0, bar=True)  # caplog's stream is no terminal: lines, not a bar
    with caplog.at_level(logging.INFO, "taid_vlm.progress"):
        steps.update(3, 2.345678, 0.4123, 1234.4)
        steps.update(12, 1.5, None, 999.6, dropped=2)
    assert [r.getMessage() for r in caplog.records] == [
        "step 3/12 loss 2.3457 t 0.412 tokens/s 1234 ETA 1m30s",  # 9 steps left at 10 s each
        "step 12/12 loss 1.5000 tokens/s 1000 dropped 2"]
    steps.close()


def test_the_bar_only_on_a_terminal(monkeypatch, caplog):
    terminal = FakeTerminal()
    monkeypatch.setattr(progress.sys, "stderr", terminal)
    with caplog.at_level(logging.INFO, "taid_vlm.progress"):
        steps = StepProgress(total=4, start=1, bar=True)
        steps.update(2, 1.0, 0.5, 10.0)
        steps.close()
        StepProgress(total=4, start=1, bar=False).update(2, 1.0, 0.5, 10.0)  # train.progress_bar: false
    assert "2/4" in terminal.getvalue() and "loss=1.0000" in terminal.getvalue()
    assert [r.getMessage() for r in caplog.records] == ["step 2/4 loss 1.0000 t 0.500 tokens/s 10 ETA 0s"]


def test_a_loop_prints_a_line_per_interval_and_nothing_when_disabled(caplog, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    with caplog.at_level(logging.INFO, "taid_vlm.progress"):
        with LoopProgress("eval step 40", total=16, interval=10.0) as loop:
            for _ in range(16):
                now[0] += 2.5  # 2.5 s a batch: a line after batches 4, 8, 12, 16
                loop.advance()
        with LoopProgress("teacher cache (rank 0)", unit="samples", interval=10.0) as cache:
            now[0] += 12.0
            cache.advance(64)
        with LoopProgress("eval step 40", total=16, enabled=False) as off:
            now[0] += 60.0
            off.advance()
    assert [r.getMessage() for r in caplog.records] == [
        "eval step 40: 4/16 batches, 10s, ETA 30s", "eval step 40: 8/16 batches, 20s, ETA 20s",
        "eval step 40: 12/16 batches, 30s, ETA 10s", "eval step 40: 16/16 batches, 40s",
        "teacher cache (rank 0): 64 samples, 12s"]
