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


def build_tiny_tokenizer(vocab_size: int = 512, save_dir: Optional[Union[str, Path]] = None):
    """Train a deterministic byte-level BPE tokenizer and wrap it as a PreTrainedTokenizerFast.

    Carries ChatML special tokens, an ``<image>`` placeholder token, a pad token and a chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
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
