"""Sampling with native Hugging Face VLMs of two families sharing one vocabulary (a Qwen2.5-VL teacher,
an InternVL student, other image spans on each side): the student (or, seq_kd, the teacher) generates
from its prompt with the sample's images; both sides are rebuilt around the same completion ids."""

import pytest
import torch

from taid_vlm.config import RunConfig, SamplingConfig
from taid_vlm.data import build_loader
from taid_vlm.train.sampling import StepSampler
from taid_vlm.train.teacher import Teacher

from models_helpers import build_pair, one_torch_thread  # noqa: F401
from test_hf_families_pair import setup  # noqa: F401 (fixture)


@pytest.mark.parametrize("who", ["student", "teacher"])
def test_cross_family_pair_generates_from_prompts_with_images(setup, who):  # noqa: F811
    _, shards, teacher_cfg, students = setup
    torch.manual_seed(0)
    teacher, student = build_pair(teacher_cfg, students["internvl"])
    batch = next(iter(build_loader(shards, student.input_spec, teacher.input_spec, mode="train", batch_size=3,
                                   max_length=512, num_workers=0, seed=0)))
    cfg = RunConfig(sampling=SamplingConfig(mode="on_policy", lmbda=1.0 if who == "student" else 0.0,
                                            seq_kd=True, max_new_tokens=6, do_sample=True))
    sampler = StepSampler(cfg, student, Teacher(teacher, "replicated", torch.device("cpu"), torch.float32), 0, 1,
                          torch.device("cpu"))
    (rebuilt,) = sampler.prepare_step([batch], step=0)
    s, t = rebuilt["student"], rebuilt["teacher"]
    assert torch.equal(s["loss_targets"], t["loss_targets"]) and 3 <= len(s["loss_targets"]) <= 18
    assert sampler.generated == 3
    for role, part in (("student", s), ("teacher", t)):
        old = batch[role]
        assert part["pixel_values"] is old["pixel_values"] and isinstance(part["pixel_values"], dict)
        for b, n in enumerate(old["prompt_lengths"].tolist()):  # each row: its own prompt, then the completion
            assert torch.equal(part["input_ids"][b, :n], old["input_ids"][b, :n])
            assert (part["labels"][b, :n] == -100).all()
    with torch.no_grad():  # the rebuilt rows still hold every image span the pixels fill
        for model, part in ((student, s), (teacher, t)):
            logits = model(part["input_ids"], part["attention_mask"], pixel_values=part["pixel_values"])
            assert torch.isfinite(logits).all()
