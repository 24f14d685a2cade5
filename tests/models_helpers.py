"""Shared helpers for the tests/test_models_*.py files: the tiny configs and input builders."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


def load_cfg(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def with_changes(cfg: dict, **changes) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg.update(changes)
    return cfg


def build_pair(teacher_cfg: dict, student_cfg: dict):
    """Teacher and student (teacher first), checked for a shared vocabulary, as the tests build them."""
    from taid_vlm.models import build_model, check_vocab_compatible

    teacher = build_model(teacher_cfg, role="teacher", where="teacher")
    student = build_model(student_cfg, role="student", where="student")
    check_vocab_compatible(teacher, student)
    return teacher, student


def text_ids(tokenizer, text: str) -> list:
    return tokenizer.encode(text, add_special_tokens=False)


def interleaved_batch(model, images_per_sample=(1, 2), seed: int = 1234):
    """Two samples padded to one length; sample i holds images_per_sample[i] images between text pieces.

    Returns (input_ids, attention_mask, pixel_values, blocks) where blocks lists (sample, start) of every
    image's placeholder run in order of appearance.
    """
    spec = model.input_spec
    tok = model.tokenizer
    g = torch.Generator().manual_seed(seed)
    rows, blocks = [], []
    for s, n_img in enumerate(images_per_sample):
        ids = text_ids(tok, "describe the picture")
        for _ in range(n_img):
            blocks.append((s, len(ids)))
            ids += [spec.image_token_id] * spec.tokens_per_image + text_ids(tok, " and then this one")
        ids += text_ids(tok, " red circle")
        rows.append(ids)
    length = max(map(len, rows))
    pad = tok.pad_token_id
    input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    h, w = model.vision.image_size if hasattr(model, "vision") else (model.hf.config.vision_config.image_size,) * 2
    pixel_values = torch.randn(sum(images_per_sample), 3, h, w, generator=g)
    return input_ids, attention_mask, pixel_values, blocks


import pytest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; on a shared 2-core machine more threads oversubscribe."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
