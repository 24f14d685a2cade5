"""The capacity-gap study loads each exported teacher: a taid-vlm model folder as `saved`, a text-only run's
export (a plain Hugging Face causal LM) as a `causal_lm` built from that folder."""

from pathlib import Path

from taid_vlm.config import load_config
from taid_vlm.experiments.compare import teacher_override

ROOT = Path(__file__).resolve().parents[1]


def test_teacher_override_for_both_kinds_of_export(tmp_path):
    vlm, hf = tmp_path / "vlm", tmp_path / "hf model"
    vlm.mkdir()
    (vlm / "taid_model.json").write_text("{}")
    hf.mkdir()
    assert teacher_override(vlm) == f"teacher.model={{saved: {vlm}}}"
    cfg = load_config(ROOT / "configs/tiny_text.yaml", [teacher_override(hf)])
    assert cfg.teacher.model == {"type": "causal_lm", "tokenizer": {"path": str(hf)}, "llm": {"path": str(hf)}}
