"""A small byte-level BPE tokenizer built offline, for tests, the demo and tiny configs.

Real runs load the teacher/student tokenizer from a local folder; this one exists so that everything
can run with no download. Training a 512-2048 token BPE on the embedded corpus takes milliseconds and
is deterministic, so two processes building it get the same vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, "<|pad|>"]

# ChatML, as Qwen2 uses; `{% generation %}` marks assistant text so return_assistant_tokens_mask works.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "a an the is are of in on at to and or with without there how many what which where color shape "
    "red green blue yellow purple orange black white gray pink brown cyan circle square triangle star "
    "rectangle ellipse left right top bottom center middle upper lower corner one two three four five "
    "six seven eight nine ten zero yes no image picture photo shows contains describe caption question "
    "answer user assistant system you are a helpful model small large big tiny object objects count "
    "position located near far above below next between this that these those it its shapes colors "
    "background foreground first second third last number total only also both each every some none"
)


def _corpus() -> list[str]:
    words = _WORDS.split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += [w.capitalize() + "." for w in words]
    lines += ["0 1 2 3 4 5 6 7 8 9 10 11 12 ? ! , . : ; ' \" ( ) [ ] { } - + = / * # @ % &"]
    return lines * 4


# Qwen2's pre-tokenizer split (transformers' tokenization_qwen2.PRETOKENIZE_REGEX, the tiktoken pattern of Qwen).
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def qwen2_pipeline(core) -> None:
    """Give a ``tokenizers.Tokenizer`` Qwen2's normalizer, pre-tokenizer and decoder.

    transformers loads any tokenizer saved beside a qwen2-type config (qwen2, qwen2_vl, internvl, ...) as
    ``Qwen2Tokenizer``, which rebuilds exactly this pipeline around the saved vocabulary. A BPE trained
    with it therefore reads text the same way from its own folder and from an exported model's folder;
    for other model types the pipeline is read from tokenizer.json as is.
    """
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()


def train_byte_level_bpe(texts, vocab_size: int, special_tokens):
    """A deterministic byte-level BPE (``tokenizers.Tokenizer``) on ``texts`` with Qwen2's pipeline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    qwen2_pipeline(core)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer=trainer)
    return core


def build_tiny_tokenizer(vocab_size: int = 512, save_dir: Optional[Union[str, Path]] = None):
    """Train a deterministic byte-level BPE tokenizer and wrap it as a PreTrainedTokenizerFast.

    Carries ChatML special tokens, an ``<image>`` placeholder token, a pad token and a chat template.
    """
    from transformers import PreTrainedTokenizerFast

    core = train_byte_level_bpe(_corpus(), vocab_size, SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token=None,
        unk_token=None,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tok.chat_template = CHATML_TEMPLATE
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok
