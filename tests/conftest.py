"""Shared test setup: no hub access, quiet transformers, deterministic seeds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from taid_vlm.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def shapes_text(tmp_path_factory):
    """240 text-only synthetic conversations (15 % held out), shared read-only by the end-to-end runs."""
    from taid_vlm.data.synthetic import synth

    out = tmp_path_factory.mktemp("shapes_text")
    synth(out, 240, seed=0, val_fraction=0.15, text_only=True)
    return out
