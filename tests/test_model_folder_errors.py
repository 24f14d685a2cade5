"""A bad model folder (corrupt, truncated or missing weights, an unknown model_type, no tokenizer or
processor files, an unsupported family) is one line naming the role's config key and the file, for
every kind of model the project loads from folders: causal LMs, native HF VLMs, composed models."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from taid_vlm.errors import UserError, error_line
from taid_vlm.models import build_model
from taid_vlm.train.components import build_role_model

from hf_family_helpers import model_cfg
from models_helpers import load_cfg, one_torch_thread  # noqa: F401
from train_helpers import CONFIGS, env, train_cmd

TINY_LM = {"type": "causal_lm", "tokenizer": {"builtin": "tiny"},
           "llm": {"config": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128}}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Good folders: a text model saved by taid-vlm (its llm/ is a Hugging Face causal LM + tokenizer), a
    composed VLM saved by taid-vlm, and a Qwen2-VL Hugging Face folder (weights, tokenizer, processor)."""
    from taid_vlm.models.tiny_family_tokenizers import build_family_tokenizer

    root = tmp_path_factory.mktemp("good")
    build_model(TINY_LM).save_pretrained(root / "text")
    build_model(load_cfg("tiny_vlm_student")).save_pretrained(root / "composed")
    build_family_tokenizer("qwen2_vl", save_dir=root / "qwen_tok")
    build_model(model_cfg("qwen2_vl", root / "qwen_tok")).write_weights(root / "qwen", None)
    return root


def damaged(saved: Path, tmp_path: Path, folder: str, change) -> Path:
    """A copy of a good folder with one file changed by ``change(folder)``."""
    copy = tmp_path / folder.replace("/", "_")
    shutil.copytree(saved / folder, copy)
    change(copy)
    return copy


def cut_in_half(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def set_model_type(folder: Path, model_type: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))


def shard_with_one_missing(folder: Path) -> None:
    """model.safetensors as the first of two indexed shards; the second was never copied."""
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def one_error_line(role: str, model_cfg: dict) -> str:
    with pytest.raises(UserError) as e:
        build_role_model(model_cfg, role)
    line = error_line(e.value)
    assert "\n" not in line, line
    return line


def causal_lm_from(folder: Path) -> dict:
    return {"type": "causal_lm", "tokenizer": {"path": str(folder)}, "llm": {"path": str(folder)}}


@pytest.mark.parametrize("change, message, file", [
    (lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096)), "corrupt or truncated weights (header too large)",
     "model.safetensors"),
    (lambda d: cut_in_half(d / "model.safetensors"), "corrupt or truncated weights (incomplete metadata, file not fully",
     "model.safetensors"),
    (lambda d: (d / "model.safetensors").unlink(), "no weights in the model folder", ""),
    (lambda d: set_model_type(d, "qwen99"), "model_type 'qwen99' is unknown to transformers", "config.json"),
    (lambda d: (d / "config.json").unlink(), "no config.json in the model folder", "config.json"),
    (shard_with_one_missing, "1 of 2 weight shards listed in model.safetensors.index.json are missing, first "
     "model-00002-of-00002.safetensors", "model-00002-of-00002.safetensors"),
])
def test_a_bad_causal_lm_folder_is_one_line_naming_the_role_and_the_file(saved, tmp_path, change, message, file):
    folder = damaged(saved, tmp_path, "text/llm", change)
    line = one_error_line("teacher", {"type": "causal_lm", "tokenizer": {"builtin": "tiny"},
                                      "llm": {"path": str(folder)}})
    assert line.startswith(f"error: teacher.model.llm.path: {message}") and line.endswith(f"({folder / file})")


def test_a_folder_without_tokenizer_files_is_refused_not_loaded_as_four_special_tokens(saved, tmp_path):
    folder = damaged(saved, tmp_path, "text/llm", lambda d: (d / "tokenizer.json").unlink())
    line = one_error_line("student", causal_lm_from(folder))
    assert line.startswith("error: student.model.tokenizer.path: no tokenizer vocabulary in the folder (expected "
                           "tokenizer.json") and line.endswith(f"({folder})")


@pytest.mark.parametrize("change, message, file", [
    (lambda d: cut_in_half(d / "model.safetensors"), "student.model.path: corrupt or truncated weights",
     "model.safetensors"),
    (lambda d: (d / "processor_config.json").unlink(), "student.model.path: no image processor in the folder",
     "processor_config.json"),
    (lambda d: set_model_type(d, "florence2"),  # known to transformers, not a family the adapter supports
     "student.model.path: model type 'florence2' is not a supported dynamic-resolution family", "config.json"),
    (lambda d: (d / "tokenizer.json").unlink(), "student.model.tokenizer.path: no tokenizer vocabulary", ""),
])
def test_a_bad_hf_vlm_folder_is_one_line_naming_the_key_and_the_file(saved, tmp_path, change, message, file):
    folder = damaged(saved, tmp_path, "qwen/hf_model", change)
    line = one_error_line("student", {"type": "hf_vlm", "path": str(folder)})
    assert line.startswith(f"error: {message}")
    assert line.endswith(f"({folder / file})") and "config.model_type" not in line


def test_a_processor_folder_of_its_own_is_named_as_processor_path(saved, tmp_path):
    empty = tmp_path / "no_processor"
    empty.mkdir()
    line = one_error_line("teacher", {"type": "hf_vlm", "path": str(saved / "qwen/hf_model"),
                                      "processor": {"path": str(empty)}})
    assert line == (f"error: teacher.model.processor.path: no image processor in the folder (expected "
                    f"processor_config.json or preprocessor_config.json) ({empty / 'processor_config.json'})")


@pytest.mark.parametrize("change, message, file", [
    (lambda d: (d / "model.safetensors").unlink(), "student.model.saved: no model.safetensors (the vision tower",
     "model.safetensors"),
    (lambda d: cut_in_half(d / "model.safetensors"), "student.model.saved: corrupt or truncated weights",
     "model.safetensors"),
    (lambda d: cut_in_half(d / "llm" / "model.safetensors"), "student.model.saved.llm.path: corrupt or truncated",
     "llm/model.safetensors"),
    (lambda d: (d / "taid_model.json").write_text("{"), "student.model.saved: taid_model.json is not valid JSON",
     "taid_model.json"),
])
def test_a_bad_saved_composed_model_is_one_line_naming_the_part(saved, tmp_path, change, message, file):
    folder = damaged(saved, tmp_path, "composed", change)
    line = one_error_line("student", {"saved": str(folder)})
    assert line.startswith(f"error: {message}") and line.endswith(f"({folder / file})")


@pytest.mark.slow
def test_train_with_a_truncated_teacher_exits_2_with_one_error_line(saved, tmp_path, shapes_text):
    import subprocess

    folder = damaged(saved, tmp_path, "text/llm", lambda d: cut_in_half(d / "model.safetensors"))
    cmd = train_cmd("tiny_text.yaml", tmp_path / "run", f"data.train={shapes_text}/train", "data.synthetic=null",
                    f"data.val={shapes_text}/val", f"teacher.model={{saved: {saved / 'text'}}}",
                    f"student.model.llm={{path: {folder}}}", "student.model.tokenizer={path: " + str(folder) + "}")
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, cwd=str(CONFIGS.parent))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"error: student.model.llm.path: corrupt or truncated weights (incomplete metadata, file not "
                      f"fully covered) ({folder / 'model.safetensors'})"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name, write", [
    ("tower.safetensors", lambda f, good: f.write_bytes(good[: len(good) // 2])),
    ("tower.bin", lambda f, good: f.write_bytes(b"not a torch file" * 64)),
])
def test_bad_open_clip_tower_weights_are_one_line_naming_the_file(tmp_path, name, write):
    from safetensors.torch import save_file

    cfg = load_cfg("tiny_vlm_student")
    good = tmp_path / "good.safetensors"
    save_file({k[len("vision.tower."):]: v.contiguous() for k, v in build_model(cfg).state_dict().items()
               if k.startswith("vision.tower.")}, str(good))
    bad = tmp_path / name
    write(bad, good.read_bytes())
    cfg["vision"]["pretrained"] = str(bad)
    line = one_error_line("teacher", cfg)
    assert line.startswith("error: teacher.model.vision.pretrained: ") and line.endswith(f"({bad})")
