"""data_tools: check_shards --json, synth_shapes determinism and content, --help of every tool."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from data_helpers import caption_sample, jpg, write_tar
from data_tools.check_shards import main as check_main
from data_tools.synth_shapes import synth
from taid_vlm.data import decode_sample, read_shard
from taid_vlm.data.skips import SkipCounter
from tests.train_helpers import SUBPROCESS_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]


def test_check_shards_json_cli(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    write_tar(tmp_path / "s" / "a.tar", [caption_sample("ok1", "a red circle"), caption_sample("ok2", "blue"),
                                         {"__key__": "bad", "jpg": jpg()[:50], "txt": b"x"},
                                         {"__key__": "badj", "jpg": jpg(), "json": b"[1,"}])
    out = subprocess.run([sys.executable, "-m", "data_tools.check_shards", str(tmp_path / "s"), "--tokenizer",
                          str(tmp_path / "tok"), "--json", "--strict"], cwd=ROOT, capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT_S)
    assert out.returncode == 1, out.stderr  # --strict: bad samples exist
    rep = json.loads(out.stdout)
    assert rep["samples"] == 2 and rep["images"] == 2 and rep["bad"] == 2
    assert rep["bad_by_reason"] == {"bad_json": 1, "corrupt_image": 1}
    assert rep["bad_examples"] == {"bad_json": ["badj"], "corrupt_image": ["bad"]}
    assert rep["formats"] == {"caption": 2}
    assert rep["text_tokens"] > rep["supervised_tokens"] > 0


def test_check_shards_missing_path(tmp_path, capsys):
    assert check_main([str(tmp_path / "nope-{0..1}.tar"), "--json"]) == 2
    assert "nope-0.tar" in capsys.readouterr().err


def _contents(folder: Path):
    out = {}
    for p in sorted(folder.rglob("*.tar")):
        with tarfile.open(p) as tf:
            out[str(p.relative_to(folder))] = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    return out


def test_synth_shapes_deterministic_and_about_shapes(tmp_path, capsys):
    a = synth(tmp_path / "a", n=40, seed=5, size=32, val_fraction=0.25, maxcount=16)
    synth(tmp_path / "b", n=40, seed=5, size=32, val_fraction=0.25, maxcount=16)
    synth(tmp_path / "c", n=40, seed=6, size=32, val_fraction=0.25, maxcount=16)
    assert _contents(tmp_path / "a") == _contents(tmp_path / "b")
    assert (tmp_path / "a/train/shard-000000.tar").read_bytes() == (tmp_path / "b/train/shard-000000.tar").read_bytes()
    assert _contents(tmp_path / "a") != _contents(tmp_path / "c")
    assert a["train"]["written"] + a["val"]["written"] == 40 and 0 < a["val"]["written"] < 20
    assert len(a["train"]["shards"]) == 2  # maxcount 16
    skips, samples = SkipCounter(), []
    for split in ("train", "val"):
        for p in sorted((tmp_path / "a" / split).glob("*.tar")):
            samples += [decode_sample(r) for r in read_shard(str(p), skips)]
    assert skips.total == 0 and len(samples) == 40
    kinds = {s.format for s in samples}
    assert kinds == {"caption", "llava"}
    assert sum(len(s.images) == 2 for s in samples) == 10  # every 4th sample has two images
    assert all(s.images[0].size == (32, 32) for s in samples)
    answers = " ".join(m["content"] for s in samples for m in s.messages if m["role"] == "assistant").lower()
    questions = " ".join(m["content"] for s in samples for m in s.messages if m["role"] == "user").lower()
    assert any(c in answers for c in ("red", "green", "blue", "yellow", "purple", "orange"))
    assert any(w in answers for w in ("circle", "square", "triangle"))
    assert "how many" in questions and ("where" in questions or "at the" in answers)
    cap = next(s for s in samples if s.format == "caption")
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["seed"] == 5
    assert cap.messages[1]["content"][0].isupper() and cap.messages[1]["content"].endswith(".")


@pytest.mark.parametrize("tool", ["make_shards", "check_shards", "index_shards", "synth_shapes", "text_corpus"])
def test_help(tool):
    out = subprocess.run([sys.executable, "-m", f"data_tools.{tool}", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert out.returncode == 0 and "usage:" in out.stdout and "--" in out.stdout
