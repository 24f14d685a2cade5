"""End to end: a trained composed student (HF CLIP tower + mlp2x_gelu + Qwen2) leaves `taid-vlm export` as a
stock Llava folder that reproduces the trained student's held-out logits and CE (fp32, 1e-5)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from taid_vlm.data.shard_io import read_shard
from taid_vlm.data.samples import decode_sample
from taid_vlm.data.skips import SkipCounter
from taid_vlm.train.export import load_student

from export_helpers import assert_export_matches
from tests.train_helpers import BIN, CONFIGS, env, run, train_cmd

pytestmark = pytest.mark.slow

STUDENT = {
    "type": "composed", "dtype": "float32", "tokenizer": {"builtin": "tiny"}, "image_token": "<image>",
    "vision": {"type": "hf", "config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                                        "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 32,
                                        "patch_size": 8}},
    "projector": {"type": "mlp2x_gelu"},
    "llm": {"config": {**yaml.safe_load((CONFIGS / "models" / "tiny_vlm_student.yaml").read_text())["llm"]["config"]}},
    "freeze": [],
}


@pytest.fixture(scope="module")
def shapes(synthetic_shards) -> Path:
    return synthetic_shards(80, seed=1, val_fraction=0.2)


def val_samples(root: Path, n: int) -> list:
    skips, out = SkipCounter(), []
    for shard in sorted((root / "val").glob("*.tar")):
        for raw in read_shard(str(shard), skips):
            out.append(decode_sample(raw))
            if len(out) == n:
                return out
    return out


def answer_ce(model_logits: torch.Tensor, ids: list, n_prompt: int) -> torch.Tensor:
    """Mean CE of the tokens after position n_prompt (the final assistant answer)."""
    logits = model_logits[n_prompt - 1 : len(ids) - 1]
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[n_prompt:]))


def test_trained_hf_tower_student_exports_as_llava_and_reproduces_held_out_logits(shapes, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_file = tmp_path / "student.yaml"
    model_file.write_text(yaml.safe_dump(STUDENT))
    out = tmp_path / "run"
    run(train_cmd("tiny_vlm.yaml", out, f"data.train={shapes}/train", f"data.val={shapes}/val", "data.synthetic=null",
                  f"student.model={model_file}", "train.total_steps=3", "train.eval_batches=0",
                  "deepspeed.zero_stage=2"), timeout=900)
    export = tmp_path / "export"
    export.mkdir()
    (export / "old.txt").write_text("an earlier export")
    refused = run_cli_expect_failure(out, export)
    assert "not empty; pass --overwrite" in refused and (export / "old.txt").is_file()
    run([str(BIN / "taid-vlm"), "export", str(out), str(export), "--overwrite"], timeout=900)
    assert not (export / "old.txt").exists()
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044 for p in export.iterdir())  # group/other readable

    student, _ = load_student(out)
    samples = val_samples(shapes, 6)
    assert len(samples) == 6
    result = assert_export_matches(student, export, samples)
    print(f"trained student vs exported Llava: max |logit diff| {result['max_abs_logit_diff']:.2e}")
    # held-out CE of the answers, ours vs stock transformers on the exported processor's inputs
    hf = AutoModelForImageTextToText.from_pretrained(str(export)).eval()
    processor = AutoProcessor.from_pretrained(str(export))
    ours, theirs = [], []
    for s in samples:
        full = processor(text=processor.apply_chat_template(s.messages, tokenize=False), images=s.images,
                         return_tensors="pt")
        prompt = processor(text=processor.apply_chat_template(s.messages[:-1], tokenize=False,
                                                              add_generation_prompt=True),
                           images=s.images, return_tensors="pt")
        ids, n = full["input_ids"][0].tolist(), prompt["input_ids"].shape[1]
        with torch.no_grad():
            ours.append(answer_ce(student(full["input_ids"], full["attention_mask"],
                                          pixel_values=full["pixel_values"])[0], ids, n))
            theirs.append(answer_ce(hf(**full).logits[0], ids, n))
    ce_ours, ce_theirs = float(torch.stack(ours).mean()), float(torch.stack(theirs).mean())
    print(f"held-out answer CE: trained {ce_ours:.6f}, exported {ce_theirs:.6f}")
    assert abs(ce_ours - ce_theirs) <= 1e-5


def run_cli_expect_failure(out: Path, export: Path) -> str:
    proc = subprocess.run([str(BIN / "taid-vlm"), "export", str(out), str(export)], env=env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr
