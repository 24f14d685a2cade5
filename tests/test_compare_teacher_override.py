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


def test_count_parameters_of_a_plain_hf_export(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from taid_vlm.experiments.runs import count_parameters

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    model.save_pretrained(tmp_path)
    expected = sum(p.numel() for p in model.parameters())  # tied: the embedding counts once
    assert count_parameters(tmp_path)["total"] == expected
