"""``--cpu-durations=N``: the N tests that used the most CPU (this process + the subprocesses it waited for),
beside their wall time. On a 2-core CI machine the tier's wall time is bounded below by its CPU time / 2, so
this, not ``--durations``, says which test to make cheaper; ``--cpu-durations-file=F`` writes every test's row
(tab-separated: cpu_s, wall_s, nodeid) for a shard-balancing pass."""

from __future__ import annotations

import os
import time

import pytest

ROWS = pytest.StashKey[list]()  # (cpu_s, wall_s, nodeid) per test, on the session's config


def pytest_addoption(parser):
    group = parser.getgroup("cpu durations")
    group.addoption("--cpu-durations", type=int, default=None, metavar="N",
                    help="list the N tests that used the most CPU (0: all)")
    group.addoption("--cpu-durations-file", default=None, metavar="FILE", help="write every test's CPU and wall time")


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    on = item.config.getoption("--cpu-durations") is not None or item.config.getoption("--cpu-durations-file")
    if not on:
        yield
        return
    cpu0, wall0 = _cpu(), time.perf_counter()
    yield  # setup + call + teardown: a module fixture's cost lands on the test that first asked for it
    item.config.stash.setdefault(ROWS, []).append((_cpu() - cpu0, time.perf_counter() - wall0, item.nodeid))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = config.getoption("--cpu-durations")
    path = config.getoption("--cpu-durations-file")
    rows = config.stash.get(ROWS, [])
    if path:
        with open(path, "w") as f:
            f.writelines(f"{c:.2f}\t{w:.2f}\t{nodeid}\n" for c, w, nodeid in rows)
    if n is None or not rows:
        return
    rows = sorted(rows, reverse=True)
    total = sum(c for c, _, _ in rows)
    terminalreporter.write_sep("=", f"most CPU (this process + waited-for subprocesses): {total:.0f} s in all")
    for cpu, wall, nodeid in rows[: n or None]:
        terminalreporter.write_line(f"{cpu:8.1f}s cpu {wall:8.1f}s wall  {nodeid}")
