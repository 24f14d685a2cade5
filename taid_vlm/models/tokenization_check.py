"""One tokenization everywhere: two tokenizers are the same when they turn the same texts into the same ids.

Equal token-to-id maps are not enough. The normalizer and the pre-tokenizer decide how text is cut before
the vocabulary is looked up, and transformers may replace both: a folder whose config.json says
``model_type: qwen2`` (or qwen2_vl, internvl, ...) loads as ``Qwen2Tokenizer``, which builds its own NFC
normalizer and digit/word-splitting pre-tokenizer around the vocabulary, whatever the saved tokenizer.json
says. A byte-level BPE trained without that split then reads ``"x 12345"`` one way in training and
another way from the exported folder. So tokenizers are compared on probe texts:

- teacher against student at start-up (``check_same_tokenization``);
- a model's tokenizer against the one its exported folder will load, at start-up
  (``check_export_round_trip``: the tokenizer saved beside the model's config in a scratch folder) and
  again by export on the folder it wrote (``first_difference`` on the reloaded tokenizer).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

# Texts where tokenizers that share a vocabulary still disagree: digits (split one by one or not), unicode
# in composed and decomposed form (NFC normalizers), runs of spaces, tabs and newlines, code, contractions
# and chat turns with the ChatML markers (special or plain text, depending on the tokenizer).
PROBE_TEXTS: tuple = (
    "return np.array([1, 2, 3])",
    "x 12345 and 3.14159, 2026-12-06 10:30; 1000000 items",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 / cafe\u0301 nai\u0308ve / \u00c5ngstr\u00f6m \u212b",
    "\u6771\u4eac\u306f\u5927\u304d\u3044 \u2014 \u0417\u0434\u0440\u0430\u0432\u0441\u0442\u0432\u0443\u0439 \U0001f600\U0001f44d\U0001f3fd",
    "a  b   c\t\td\n\n\n    e \r\n f      ",
    "def square(x):\n    # the square of x\n    return x ** 2  # 'x' squared\n\n\nclass A:\n\tpass\n",
    "It's what we'll do, I'M sure they've said; don't",
    "<|im_start|>user\nHow many circles?<|im_end|>\n<|im_start|>assistant\nThree red circles.<|im_end|>\n",
    "   leading spaces, trailing spaces   ",
    "{\"key\": [1.5e-3, -2], \"url\": \"https://example.com/a?b=c&d=%20\"}",
)


@dataclass(frozen=True)
class TokenizationDifference:
    text: str
    ids_a: List[int]
    ids_b: List[int]
    add_special_tokens: bool

    def describe(self, name_a: str, name_b: str) -> str:
        k = next((i for i, (a, b) in enumerate(zip(self.ids_a, self.ids_b)) if a != b),
                 min(len(self.ids_a), len(self.ids_b)))
        return (f"{self.text!r} (add_special_tokens={self.add_special_tokens}) becomes {len(self.ids_a)} ids with "
                f"{name_a} and {len(self.ids_b)} with {name_b}, first different at id {k}: "
                f"{self.ids_a[k:k + 8]} vs {self.ids_b[k:k + 8]}")


def describe_tokenizer(tokenizer) -> str:
    """``Qwen2Tokenizer('path/to/folder')``: the class decides the pre-tokenizer, so it is named too."""
    name = getattr(tokenizer, "name_or_path", "") or "<in memory>"
    return f"{type(tokenizer).__name__}({str(name)!r})"


def probe_texts(*tokenizers) -> List[str]:
    """The fixed probes plus one line of each tokenizer's own special tokens."""
    texts = list(PROBE_TEXTS)
    for tok in tokenizers:
        specials = [t for t in getattr(tok, "all_special_tokens", []) if t]
        if specials:
            texts.append("text " + " x ".join(specials) + " text")
    return texts


def encode(tokenizer, text: str, add_special_tokens: bool) -> List[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def first_difference(tok_a, tok_b, texts: Optional[Sequence[str]] = None,
                     add_special_tokens: Sequence[bool] = (False,)) -> Optional[TokenizationDifference]:
    """The first probe text the two tokenizers turn into different ids, or None."""
    for text in texts if texts is not None else probe_texts(tok_a, tok_b):
        for special in add_special_tokens:
            a, b = encode(tok_a, text, special), encode(tok_b, text, special)
            if a != b:
                return TokenizationDifference(text, a, b, special)
    return None


def check_same_tokenization(teacher_tokenizer, student_tokenizer) -> None:
    """ValueError naming both tokenizers and the first text they read differently.

    The loss pairs the k-th supervised token of the student with the k-th of the teacher: with two
    tokenizations the pairs drift apart (the aligner can only drop the tokens that do not match).
    """
    diff = first_difference(teacher_tokenizer, student_tokenizer)
    if diff is not None:
        t, s = describe_tokenizer(teacher_tokenizer), describe_tokenizer(student_tokenizer)
        raise ValueError(f"teacher and student tokenize text differently (same vocabulary, another normalizer or "
                         f"pre-tokenizer): {diff.describe('the teacher ' + t, 'the student ' + s)}; give both models "
                         "the same tokenizer folder")


def reload_beside_config(tokenizer, hf_config, load: Optional[Callable] = None):
    """The tokenizer as ``AutoTokenizer`` loads it from a folder holding it and ``hf_config``'s config.json,
    which is what an exported model's users get."""
    if load is None:
        from transformers import AutoTokenizer

        load = AutoTokenizer.from_pretrained
    with tempfile.TemporaryDirectory(prefix="taid-tokenizer-") as tmp:
        hf_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = load(tmp)
        reloaded.name_or_path = f"<saved beside a {hf_config.model_type} config.json>"
        return reloaded


def check_export_round_trip(tokenizer, hf_config, where: str) -> None:
    """ValueError unless ``tokenizer`` reads the probes as it will once saved beside ``hf_config``.

    Checked before training: a model must not learn a tokenization its exported folder does not reproduce.
    """
    reloaded = reload_beside_config(tokenizer, hf_config)
    diff = first_difference(tokenizer, reloaded, add_special_tokens=(False, True))
    if diff is not None:
        raise ValueError(
            f"{where}: tokenizer {describe_tokenizer(tokenizer)} reads text differently once saved beside this "
            f"{hf_config.model_type} model, where transformers loads it as {type(reloaded).__name__}: "
            f"{diff.describe('the tokenizer as given', 'the exported folder')}. The exported model would not read "
            f"text as it was trained to. Use a tokenizer built for {hf_config.model_type} (for a byte-level BPE "
            "of your own: taid_vlm.tokenizer.qwen2_pipeline), or a model type whose tokenizer class reads "
            "tokenizer.json as is (e.g. llama)")


def _folder_model_type(tokenizer) -> Optional[str]:
    import json

    config = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def check_model_export_round_trip(model, where: str) -> None:
    """``check_export_round_trip`` for a DistillableModel, skipped when its tokenizer already comes from a
    folder whose config.json has the model's type (transformers then loaded it the way an export will)."""
    hf_config = model.hf_config_beside_tokenizer()
    if _folder_model_type(model.tokenizer) == hf_config.model_type:
        return
    check_export_round_trip(model.tokenizer, hf_config, where)
