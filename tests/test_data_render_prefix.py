"""One supervision rule for every chat template (data/chat_tokens.py): the answer's tokens and the end-of-turn
special token after it, whatever the template's {% generation %} blocks cover (none, as in Qwen2's stock
template; the answer and end-of-turn, as in our ChatML; the answer only, as in LLaVA-OneVision's)."""

from taid_vlm.data.render import IGNORE_INDEX, Renderer
from taid_vlm.data.samples import Sample
from taid_vlm.spec import InputSpec
from taid_vlm.tokenizer import CHATML_TEMPLATE

PLAIN_CHATML = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
ANSWER_ONLY = CHATML_TEMPLATE.replace("{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
                                      "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}")
MESSAGES = [
    {"role": "system", "content": "You are a helpful model."},
    {"role": "user", "content": "What color is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "How many shapes are there?"},
    {"role": "assistant", "content": "two"},
]


def test_every_template_supervises_the_answers_and_their_end_of_turn_token_only(tiny_tokenizer):
    assert ANSWER_ONLY != CHATML_TEMPLATE
    sample = Sample(key="k", images=[], messages=MESSAGES)
    rendered = [Renderer(InputSpec(tiny_tokenizer, chat_template=t), 512)(sample)
                for t in (CHATML_TEMPLATE, PLAIN_CHATML, ANSWER_ONLY)]
    assert rendered[0].input_ids == rendered[1].input_ids == rendered[2].input_ids
    assert rendered[0].labels == rendered[1].labels == rendered[2].labels
    labels = rendered[0].labels
    supervised = tiny_tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert supervised == "red<|im_end|>two<|im_end|>"
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    # every supervised <|im_end|> closes an assistant turn; the newline after it is not supervised
    ends = [i for i, t in enumerate(labels) if t == im_end]
    assert len(ends) == 2 and all(labels[i + 1] == IGNORE_INDEX for i in ends)
