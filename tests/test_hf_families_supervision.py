"""The published chat templates of the ten hf_vlm families through our renderer: list-form content where a
template needs it (detected by a probe), and one supervision rule (data/chat_tokens.py), so that a teacher and a
student of different families supervise the same text tokens: the cross-family pair of issue 20 (an InternVL
teacher, a LLaVA-OneVision student) drops no supervised token, whatever OneVision's {% generation %} block covers."""

import dataclasses

import pytest

from taid_vlm.data import Renderer, Sample
from taid_vlm.data.align import align_labels
from taid_vlm.data.chat_tokens import LIST, STRING, content_form
from taid_vlm.models import build_model
from taid_vlm.models.hf_families import FAMILIES
from taid_vlm.tokenizer import CHATML_TEMPLATE

from hf_family_helpers import END_OF_TURN, build_published_family_tokenizer, model_cfg, photo, published_template
from models_helpers import one_torch_thread  # noqa: F401

ANSWERS = ["red circle on the left", "two blue squares", "a green star", "yes", "the yellow one is bigger"]
SAMPLES = [Sample(key=f"c{i}", images=[photo(10 * i + k, 40 + 13 * k, 70 - 11 * k) for k in range(1 + i % 3)],
                  messages=[{"role": "user", "content": "<image>\n" * (1 + i % 3) + "What do you see?"},
                            {"role": "assistant", "content": ANSWERS[i % 5]},
                            {"role": "user", "content": "Anything else?"},
                            {"role": "assistant", "content": ANSWERS[(i + 2) % 5]}]) for i in range(6)]
# LLaVA-OneVision's published template made to read string content: its {% generation %} block covers the answer
# only (not <|im_end|>); under the old rule (generation blocks, else prefixes) it dropped 4 tokens per sample
ONEVISION_STRING = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
                    "{% if message['role'] != 'assistant' %}{{ message['content'] }}{% else %}{% generation %}"
                    "{{ message['content'] }}{% endgeneration %}{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}"
                    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def renderers(tmp_path_factory):
    out = {}
    for name in sorted(FAMILIES):
        folder = tmp_path_factory.mktemp(name)
        build_published_family_tokenizer(name, folder)
        out[name] = Renderer(build_model(model_cfg(name, folder)).input_spec, 4096)
    return out


def test_the_content_form_is_detected_from_the_template(renderers):
    tok = renderers["internvl"].spec.tokenizer
    assert content_form(tok, CHATML_TEMPLATE) == STRING  # ours: string content only
    assert content_form(tok, ONEVISION_STRING) == STRING
    assert {name: r.form for name, r in renderers.items()} == {name: LIST for name in FAMILIES}
    # why it matters: the list-only templates render nothing of string content (or raise)
    for name in ("llava_onevision", "llava_next", "idefics3", "smolvlm"):
        try:
            text = tok.apply_chat_template([{"role": "user", "content": "What do you see?"},
                                            {"role": "assistant", "content": "a green star"}],
                                           chat_template=published_template(name), tokenize=False)
        except Exception:  # noqa: BLE001 - LLaVA-NeXT indexes the content list
            text = ""
        assert "What do you see?" not in text and "a green star" not in text, name


@pytest.mark.parametrize("onevision_template", ["published", "string content, answer-only generation block"])
def test_internvl_teacher_and_llava_onevision_student_supervise_the_same_tokens(renderers, onevision_template):
    teacher, student = renderers["internvl"], renderers["llava_onevision"]
    if onevision_template != "published":
        student = Renderer(dataclasses.replace(student.spec, chat_template=ONEVISION_STRING), 4096)
        assert student.form == STRING
    for sample in SAMPLES:
        s, t = student(sample), teacher(sample)
        _, _, dropped = align_labels(s.labels, t.labels)
        assert dropped == 0, (sample.key, dropped)
        sup = [x for x in s.labels if x != -100]
        assert sup == [x for x in t.labels if x != -100]
        text = student.spec.tokenizer.decode(sup)
        i = int(sample.key[1:])
        assert text == f"{ANSWERS[i % 5]}<|im_end|>{ANSWERS[(i + 2) % 5]}<|im_end|>"


def test_every_family_aligns_with_an_internvl_teacher_up_to_its_own_end_of_turn_token(renderers):
    """Against an InternVL teacher, a family drops only what differs by construction: its end-of-turn token when
    that is not <|im_end|>, and an answer's first token where its template puts a space before the answer."""
    tok = renderers["internvl"].spec.tokenizer
    for name, renderer in renderers.items():
        eot = tok.convert_tokens_to_ids(END_OF_TURN[name])
        for sample in SAMPLES:
            s, t = renderer(sample), renderers["internvl"](sample)
            kept, _, dropped = align_labels(s.labels, t.labels)
            lost = [x for x, k in zip(s.labels, kept) if x != -100 and k == -100]
            assert all(x == eot or tok.decode([x]).startswith(" ") for x in lost), (name, tok.decode(lost))
            if END_OF_TURN[name] == "<|im_end|>" and not any(tok.decode([x]).startswith(" ") for x in lost):
                assert dropped == 0, (name, sample.key)
            assert len(lost) <= 4, (name, tok.decode(lost))  # per sample: 2 turns x (end of turn + first token)


@pytest.mark.parametrize("name", ["internvl", "llava_onevision", "llava_next", "qwen2_5_vl"])
def test_llava_format_data_renders_as_the_processor_renders_an_image_item(renderers, name):
    """Data in LLaVA format writes "<image>\\n" before the question; a template that writes its own newline after
    an image (InternVL, LLaVA-OneVision, LLaVA-NeXT) renders it once, as the family's processor renders
    [image, question]; a template that writes none (Qwen) keeps the data's newline."""
    renderer = renderers[name]
    proc = renderer.spec.image_processor.processor
    sample = SAMPLES[1]  # two images, "<image>\n<image>\nWhat do you see?"
    sep = "\n" if name != "qwen2_5_vl" else ""
    assert renderer.after_image == sep
    image, text = {"type": "image"}, (lambda t: {"type": "text", "text": t})
    user = [image, image, text("What do you see?")] if sep else [image, text("\n"), image, text("\nWhat do you see?")]
    hf_style = [{"role": "user", "content": user}] + [{"role": m["role"], "content": [text(m["content"])]}
                                                      for m in sample.messages[1:]]
    want = proc(text=[proc.apply_chat_template(hf_style, tokenize=False)], images=[sample.images], return_tensors="pt",
                add_special_tokens=False)["input_ids"][0].tolist()
    assert renderer(sample).input_ids == want
