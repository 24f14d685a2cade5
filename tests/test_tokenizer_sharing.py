"""Teacher and student folders with byte-identical tokenizer files share one loaded tokenizer."""

from __future__ import annotations

import gc
import shutil

from taid_vlm.models.tokenizer_loading import _LOADED, load_tokenizer, tokenizer_fingerprint
from taid_vlm.tokenizer import build_tiny_tokenizer


def test_identical_folders_share_one_tokenizer_and_different_ones_do_not(tmp_path):
    build_tiny_tokenizer(save_dir=tmp_path / "student")
    shutil.copytree(tmp_path / "student", tmp_path / "teacher")
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"weights are not part of the fingerprint")
    build_tiny_tokenizer(vocab_size=600, save_dir=tmp_path / "other")

    student = load_tokenizer({"path": str(tmp_path / "student")})
    teacher = load_tokenizer({"path": str(tmp_path / "teacher")})
    other = load_tokenizer({"path": str(tmp_path / "other")})
    assert teacher is student
    assert other is not student and len(other) == 600 and len(student) == 512
    assert student.encode("a red circle") == other.encode("a red circle")[: len(student.encode("a red circle"))]

    # a config.json whose model type differs may make AutoTokenizer pick another class: not shared
    (tmp_path / "teacher" / "config.json").write_text('{"model_type": "llama"}')
    assert tokenizer_fingerprint(tmp_path / "teacher") != tokenizer_fingerprint(tmp_path / "student")

    # an edited tokenizer file is a different tokenizer
    shutil.copytree(tmp_path / "student", tmp_path / "edited")
    config = tmp_path / "edited" / "tokenizer_config.json"
    config.write_text(config.read_text() + " ")
    assert tokenizer_fingerprint(tmp_path / "edited") != tokenizer_fingerprint(tmp_path / "student")


def test_the_cache_does_not_keep_a_tokenizer_alive(tmp_path):
    build_tiny_tokenizer(save_dir=tmp_path / "tok")
    key = tokenizer_fingerprint(tmp_path / "tok")
    tokenizer = load_tokenizer({"path": str(tmp_path / "tok")})
    assert _LOADED.get(key) is tokenizer
    del tokenizer
    gc.collect()
    assert _LOADED.get(key) is None
