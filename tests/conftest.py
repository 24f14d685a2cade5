"""Shared test setup: no hub access, quiet transformers, deterministic seeds."""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest_plugins = ["tests.cpu_durations", "pytester"]  # --cpu-durations=N; pytester: test_cpu_durations.py


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from taid_vlm.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """``make(n, seed=0, size=64, val_fraction=0.1, text_only=False)`` -> a folder of synthetic shapes shards
    (train/ and val/), written once per session for each argument set and shared read-only: the one writer
    of the tests' data sets (what each module asks for is what its measured tolerances were set on)."""
    from taid_vlm.data.synthetic import synth

    made = {}

    def make(n: int, seed: int = 0, size: int = 64, val_fraction: float = 0.1, text_only: bool = False) -> Path:
        key = (n, seed, size, val_fraction, text_only)
        if key not in made:
            made[key] = tmp_path_factory.mktemp("shapes_text" if text_only else "shapes")
            synth(made[key], n, seed=seed, size=size, val_fraction=val_fraction, text_only=text_only)
        return made[key]

    return make


@pytest.fixture(scope="session")
def shapes_text(synthetic_shards):
    """240 text-only synthetic conversations (15 % held out), shared read-only by the end-to-end runs."""
    return synthetic_shards(240, val_fraction=0.15, text_only=True)


@pytest.fixture(scope="module")
def one_process_group():
    """In-process training sets RANK, MASTER_PORT ... and a gloo group of one: the module's environment is
    restored afterwards, or a later test's `taid-vlm train` subprocess would inherit MASTER_PORT and collide
    with this process's store. (The group stays: DeepSpeed caches it, a destroyed group breaks the next
    in-process run.)"""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def demo_quick(tmp_path_factory):
    """`taid-vlm demo --quick` run once per session (~50 s of subprocesses): (the finished process, its --out).
    test_experiments_cli checks its output and report; the docs' `taid-vlm compare configs/demo/distill.yaml`
    commands distill from its teacher and data (tests/test_docs_commands.py copies them: read-only here)."""
    from tests.train_helpers import REPO, SUBPROCESS_TIMEOUT_S, env

    out = tmp_path_factory.mktemp("demo_quick") / "demo"
    proc = subprocess.run([sys.executable, "-m", "taid_vlm.cli", "demo", "--quick", "--out", str(out)], env=env(),
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, Path(out)
