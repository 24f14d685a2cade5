"""Tiny offline tokenizers for the HF VLM families (tests, demo, config-only recipes).

All families share ONE byte-level BPE vocabulary (the tiny corpus plus every family's special tokens),
so a teacher of one family and a student of another can be distilled together. What differs per
family is what its processor reads from the tokenizer (``image_token``, ``boi_token``, ...), its
eos/pad tokens and a chat template shaped like the family's real one (string or list content).
"""

from __future__ import annotations

from typing import Dict

_CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
_QWEN = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
_LLAVA = ["<image>", "<video>"]
_INTERNVL = ["<img>", "</img>", "<IMG_CONTEXT>"]
_IDEFICS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
_GEMMA = ["<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
_MISTRAL = ["<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
SPECIAL_TOKENS = _CHATML + _QWEN + _LLAVA + _INTERNVL + _IDEFICS + _GEMMA + _MISTRAL + ["<|begin_of_text|>"]


def _content(image: str) -> str:
    """Jinja for one message's content: a string as is, or a list of {type: image | text} items."""
    return ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '" + image + "' }}"
            "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}")


def _chatml(image: str) -> str:
    return ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}" + _content(image)
            + "{{ '<|im_end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


_IDEFICS_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}{{ ':' }}" + _content("<image>")
    + "{{ '<end_of_utterance>\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
_GEMMA_TEMPLATE = (
    "{{ '<bos>' }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' }}" + _content("<start_of_image>")
    + "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
_MISTRAL_TEMPLATE = (
    "{{ '<s>' }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST]' }}" + _content("[IMG]")
    + "{{ '[/INST]' }}{% else %}" + _content("[IMG]") + "{{ '</s>' }}{% endif %}{% endfor %}")

_QWEN_ATTRS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
_IDEFICS_ATTRS = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                  "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
# family -> (tokenizer attributes, eos token, chat template)
FAMILY_TOKENIZERS: Dict[str, tuple] = {
    "qwen2_vl": (_QWEN_ATTRS, "<|im_end|>", _chatml("<|vision_start|><|image_pad|><|vision_end|>")),
    "qwen2_5_vl": (_QWEN_ATTRS, "<|im_end|>", _chatml("<|vision_start|><|image_pad|><|vision_end|>")),
    "qwen3_vl": (_QWEN_ATTRS, "<|im_end|>", _chatml("<|vision_start|><|image_pad|><|vision_end|>")),
    "llava": ({"image_token": "<image>"}, "<|im_end|>", _chatml("<image>")),
    "llava_next": ({"image_token": "<image>"}, "<|im_end|>", _chatml("<image>")),
    "llava_onevision": ({"image_token": "<image>", "video_token": "<video>"}, "<|im_end|>", _chatml("<image>")),
    "internvl": ({"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                  "video_token": "<video>"}, "<|im_end|>", _chatml("<IMG_CONTEXT>")),
    "idefics3": (_IDEFICS_ATTRS, "<end_of_utterance>", _IDEFICS_TEMPLATE),
    "smolvlm": (_IDEFICS_ATTRS, "<end_of_utterance>", _IDEFICS_TEMPLATE),
    "gemma3": ({"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
               "<end_of_turn>", _GEMMA_TEMPLATE),
    "mistral3": ({"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"},
                 "</s>", _MISTRAL_TEMPLATE),
}


def build_family_tokenizer(model_type: str, vocab_size: int = 600, save_dir=None, chat_template=None, bos_token=None):
    """The shared tiny vocabulary, dressed as ``model_type``'s tokenizer (with its chat template, or
    ``chat_template``, e.g. the family's published one; ``bos_token`` for templates that write it)."""
    from transformers import PreTrainedTokenizerFast

    from taid_vlm.tokenizer import _corpus, train_byte_level_bpe

    if model_type not in FAMILY_TOKENIZERS:
        raise ValueError(f"no tiny tokenizer for model type {model_type!r}; known: {sorted(FAMILY_TOKENIZERS)}")
    attrs, eos, template = FAMILY_TOKENIZERS[model_type]
    core = train_byte_level_bpe(_corpus(), vocab_size, SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, pad_token="<|pad|>", bos_token=bos_token,
                                  unk_token=None, extra_special_tokens=dict(attrs))
    tok.chat_template = chat_template or template
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok
