"""Chat templates without {% generation %} blocks (Qwen2's stock template, for one) still give
assistant-only labels, by prefix rendering."""

from taid_vlm.data.render import IGNORE_INDEX, Renderer, has_generation_blocks
from taid_vlm.data.samples import Sample
from taid_vlm.spec import InputSpec
from taid_vlm.tokenizer import CHATML_TEMPLATE

PLAIN_CHATML = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
MESSAGES = [
    {"role": "system", "content": "You are a helpful model."},
    {"role": "user", "content": "What color is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "How many shapes are there?"},
    {"role": "assistant", "content": "two"},
]


def test_prefix_rendering_supervises_exactly_the_assistant_turns(tiny_tokenizer):
    assert has_generation_blocks(CHATML_TEMPLATE) and not has_generation_blocks(PLAIN_CHATML)
    sample = Sample(key="k", images=[], messages=MESSAGES)
    marked = Renderer(InputSpec(tiny_tokenizer, chat_template=CHATML_TEMPLATE), 512)(sample)
    plain = Renderer(InputSpec(tiny_tokenizer, chat_template=PLAIN_CHATML), 512)(sample)
    assert plain.input_ids == marked.input_ids
    newline = tiny_tokenizer.encode("\n", add_special_tokens=False)
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    extra = [i for i, (a, b) in enumerate(zip(marked.labels, plain.labels)) if a != b]
    # Same supervised tokens, plus the newline the template writes after each assistant turn.
    assert len(extra) == 2
    for i in extra:
        assert marked.labels[i] == IGNORE_INDEX and [plain.labels[i]] == newline
        assert plain.input_ids[i - 1] == im_end
    supervised = tiny_tokenizer.decode([t for t in marked.labels if t != IGNORE_INDEX])
    assert supervised == "red<|im_end|>two<|im_end|>"
