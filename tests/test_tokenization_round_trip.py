"""What goes in is what comes out: an exported student reads text exactly as it was trained to.

For every export kind (plain causal LM, Llava from a composed student, a native HF VLM) and every kind of
tokenizer the project builds or accepts, the exported folder loaded by AutoTokenizer / AutoProcessor turns
the probe texts into the ids the trained model used. A byte-level BPE without Qwen2's pre-tokenizer (what
the project itself built before, and what a user may bring) cannot round-trip beside a qwen2 config: it is
refused at start-up and at export instead of silently reading text another way.
"""

from __future__ import annotations

import pytest
from transformers import AutoProcessor, AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

from taid_vlm.models import build_model, check_vocab_compatible
from taid_vlm.models.tokenization_check import (PROBE_TEXTS, check_export_round_trip, check_model_export_round_trip,
                                                first_difference, probe_texts)
from taid_vlm.tokenizer import CHATML_TEMPLATE, IMAGE_TOKEN, SPECIAL_TOKENS, build_tiny_tokenizer
from taid_vlm.train.export import FORMAT_CAUSAL_LM, FORMAT_HF_VLM, ExportError, write_student

from hf_family_helpers import model_cfg
from models_helpers import load_cfg, with_changes

CLIP = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": 32, "patch_size": 8}


def _plain_byte_level(save_dir):
    """The tiny vocabulary and merges behind a plain byte-level pre-tokenizer (no digit/word split, no NFC):
    how the project's own tokenizers read text before this fix, and what a user's own BPE may look like."""
    from tokenizers import decoders, pre_tokenizers

    tok = build_tiny_tokenizer()
    core = tok.backend_tokenizer
    core.normalizer = None
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    plain = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|pad|>",
                                    extra_special_tokens={"image_token": IMAGE_TOKEN})
    plain.chat_template = CHATML_TEMPLATE
    plain.save_pretrained(str(save_dir))


def _text_corpus(save_dir):
    from data_tools.text_corpus import train_tokenizer

    texts = ["def f(x):\n    return x + 12345\n", "import numpy as np  # café", "class A:\n\tpass\n"] * 40
    train_tokenizer(texts, 400, save_dir)


def _stock(cls, save_dir, image_token=IMAGE_TOKEN):
    """A stock transformers tokenizer class (Qwen2's, Llama's) over the tiny vocabulary: what a hub folder
    of that family holds (tokenizer_config.json names the class)."""
    import json

    tiny = build_tiny_tokenizer()
    model = json.loads(tiny.backend_tokenizer.to_str())["model"]
    vocab, merges = model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    kwargs = {"pad_token": "<|pad|>", "eos_token": "<|im_end|>"} if cls is Qwen2Tokenizer else {}
    tok = cls(vocab=vocab, merges=merges, extra_special_tokens={"image_token": image_token}, **kwargs)
    tok.add_tokens([t for t in SPECIAL_TOKENS if t not in tok.get_vocab()], special_tokens=True)
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(str(save_dir))


BUILDERS = {
    "tiny": lambda d: build_tiny_tokenizer(save_dir=d),
    "text_corpus": _text_corpus,
    "stock_qwen2": lambda d: _stock(Qwen2Tokenizer, d),
    "stock_llama": lambda d: _stock(LlamaTokenizer, d),
    "plain_byte_level": _plain_byte_level,
}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    for name, build in BUILDERS.items():
        build(root / name)
    return root


def _text_student(tok_dir, model_type="qwen2"):
    cfg = with_changes(load_cfg("tiny_text_student"), tokenizer={"path": str(tok_dir)})
    cfg["llm"]["config"]["model_type"] = model_type
    return build_model(cfg)


def _llava_student(tok_dir):
    cfg = with_changes(load_cfg("tiny_vlm_student"), tokenizer={"path": str(tok_dir)},
                       vision={"type": "hf", "config": CLIP}, projector={"type": "mlp2x_gelu"})
    return build_model(cfg)


def _reloaded(folder, fmt):
    if fmt == FORMAT_HF_VLM:
        return AutoProcessor.from_pretrained(str(folder)).tokenizer
    return AutoTokenizer.from_pretrained(str(folder))


def _assert_round_trip(student, folder):
    fmt = write_student(student, folder)
    reloaded = _reloaded(folder, fmt)
    texts = probe_texts(student.tokenizer)
    for text in texts:
        for special in (False, True):
            ours = student.tokenizer(text, add_special_tokens=special)["input_ids"]
            assert reloaded(text, add_special_tokens=special)["input_ids"] == ours, (text, type(reloaded).__name__)
    return fmt


ROUND_TRIPS = [("tiny", "qwen2"), ("tiny", "llama"), ("text_corpus", "qwen2"), ("stock_qwen2", "qwen2"),
               ("stock_llama", "llama"), ("plain_byte_level", "llama")]


@pytest.mark.parametrize("kind,model_type", ROUND_TRIPS, ids=[f"{k}-{m}" for k, m in ROUND_TRIPS])
def test_text_export_reads_text_as_trained(tokenizer_dirs, tmp_path, kind, model_type):
    student = _text_student(tokenizer_dirs / kind, model_type)
    check_model_export_round_trip(student, "student.model.tokenizer")  # the start-up check agrees
    assert _assert_round_trip(student, tmp_path / "out") == FORMAT_CAUSAL_LM


@pytest.mark.parametrize("kind", ["tiny", "text_corpus", "stock_qwen2"])
def test_llava_export_reads_text_as_trained(tokenizer_dirs, tmp_path, kind):
    assert _assert_round_trip(_llava_student(tokenizer_dirs / kind), tmp_path / "out") == FORMAT_HF_VLM


@pytest.mark.parametrize("model_type", ["qwen2_vl", "internvl", "llava_onevision", "gemma3", "smolvlm"])
def test_hf_vlm_export_reads_text_as_trained(tmp_path, model_type):
    from taid_vlm.models.tiny_family_tokenizers import build_family_tokenizer

    build_family_tokenizer(model_type, save_dir=tmp_path / "tok")
    student = build_model(model_cfg(model_type, tmp_path / "tok"))
    assert _assert_round_trip(student, tmp_path / "out") == FORMAT_HF_VLM


def test_a_tokenizer_that_a_qwen2_folder_reads_differently_is_refused_at_start_and_at_export(tokenizer_dirs, tmp_path):
    student = _text_student(tokenizer_dirs / "plain_byte_level", "qwen2")
    with pytest.raises(ValueError, match=r"student.model.tokenizer: tokenizer TokenizersBackend\(.*plain_byte_level.*"
                                         r"loads it as Qwen2Tokenizer: .* becomes \d+ ids .* first different at id \d+"):
        check_model_export_round_trip(student, "student.model.tokenizer")
    with pytest.raises(ExportError, match="would tokenize differently from the trained student.*nothing was written"):
        write_student(student, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_folder_rebuilds_the_qwen2_pipeline_around_the_same_vocabulary(tokenizer_dirs):
    """The defect as users met it: the same tokenizer.json, other ids beside a qwen2 config.json."""
    from transformers import Qwen2Config

    plain = AutoTokenizer.from_pretrained(str(tokenizer_dirs / "plain_byte_level"))
    with pytest.raises(ValueError, match="loads it as Qwen2Tokenizer"):
        check_export_round_trip(plain, Qwen2Config(), "model.tokenizer")
    ours = AutoTokenizer.from_pretrained(str(tokenizer_dirs / "tiny"))
    check_export_round_trip(ours, Qwen2Config(), "model.tokenizer")
    qwen2 = Qwen2Tokenizer.from_pretrained(str(tokenizer_dirs / "plain_byte_level"))  # what the folder loads
    # Qwen2Tokenizer composes unicode (NFC) before the split: 'e' + combining acute is one character there
    text = "cafe\u0301"
    assert plain(text)["input_ids"] != qwen2(text)["input_ids"] == ours(text)["input_ids"]


def test_teacher_and_student_must_tokenize_alike_not_only_share_a_vocabulary(tokenizer_dirs):
    """Same token-to-id map (the tiny corpus trains the same merges), another pre-tokenizer: a start-up error
    naming both folders and the first probe text they read differently."""
    plain = _text_student(tokenizer_dirs / "plain_byte_level", "llama")
    tiny = _text_student(tokenizer_dirs / "tiny", "llama")
    assert plain.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    with pytest.raises(ValueError, match=r"tokenize text differently.*becomes \d+ ids with the teacher .*plain_byte_level.*"
                                         r"the student .*tiny.*first different at id") as err:
        check_vocab_compatible(teacher=plain, student=tiny)
    assert "the teacher" in str(err.value) and "the student" in str(err.value)
    check_vocab_compatible(teacher=tiny, student=_text_student(tokenizer_dirs / "tiny", "qwen2"))


def test_probe_texts_cover_what_tokenizers_disagree_on():
    joined = "".join(PROBE_TEXTS)
    for needle in ("12345", "cafe\u0301", "caf\u00e9", "  ", "\t", "\n\n", "def ", "<|im_start|>", "'ll"):
        assert needle in joined, needle
    tiny = build_tiny_tokenizer()
    assert first_difference(tiny, tiny) is None
    assert any("<|im_end|>" in t for t in probe_texts(tiny)[len(PROBE_TEXTS):])
