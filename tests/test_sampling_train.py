"""Sampling modes inside the trainer (in this process, a world of one): each mode trains, the labels are
exactly the generated tokens, and a resumed run (replay buffer and threshold from the checkpoint)
continues as the uninterrupted one."""

from __future__ import annotations

import math

import pytest
import torch

from taid_vlm.train.sampling.generation import generate_completions
from taid_vlm.train.trainer import Trainer
from tests.test_trainer_recipe import config, small_text  # noqa: F401 (a fixture)

GENERATION = ["sampling.max_new_tokens=8", "sampling.do_sample=true", "sampling.temperature=1.3"]


def _run(data, out, mode, *overrides):
    return Trainer(config(data, out, f"sampling.mode={mode}", *GENERATION, *overrides)).setup().resume()


@pytest.mark.slow
def test_on_policy_labels_are_exactly_the_students_completions(small_text, tmp_path, one_process_group):
    run = _run(small_text, tmp_path / "run", "on_policy", "sampling.lmbda=1.0")
    batch = next(iter(run.train_loader))
    (rebuilt,) = run.sampler.prepare_step([batch], step=0)
    s, t = rebuilt["student"], rebuilt["teacher"]
    prompts = [row[:n].tolist() for row, n in zip(batch["student"]["input_ids"], batch["student"]["prompt_lengths"])]
    want = generate_completions(run.student_model, prompts, batch["indices"], [8] * len(prompts), run.cfg.sampling,
                                run.cfg.seed, run.sampler.pad["student"], run.device)
    assert s["loss_targets"].tolist() == [tok for c in want for tok in c]
    assert torch.equal(t["loss_targets"], s["loss_targets"])  # the teacher scores the same completion
    for b, (p, c) in enumerate(zip(prompts, want)):
        assert s["input_ids"][b, : len(p) + len(c)].tolist() == p + c
        assert (s["labels"][b, : len(p)] == -100).all() and s["labels"][b, len(p): len(p) + len(c)].tolist() == c
    assert rebuilt["keys"] == batch["keys"] and rebuilt["indices"] == batch["indices"]
    records = [run.train_step() for _ in range(2)]
    assert all(math.isfinite(r["loss"]) and 0 < r["supervised_tokens"] <= 4 * 8 for r in records)


@pytest.mark.slow
@pytest.mark.parametrize("mode,extra", [("mixed", []), ("adaptive", []), ("on_policy", ["sampling.seq_kd=true",
                                                                                         "sampling.lmbda=0.5"])])
def test_each_mode_trains_and_a_resumed_run_continues_the_same(small_text, tmp_path, one_process_group, mode, extra):
    overrides = ["train.grad_accum=2", "sampling.capacity=12", "train.eval_every=100", *extra]
    run = _run(small_text, tmp_path / "run", mode, *overrides)
    if mode == "adaptive":  # as if validation losses had risen 5 times: generate while the buffer fills, then replay
        run.sampler.policy.threshold, run.sampler.policy.prev_loss = 0.5, 1.0
    records = [run.train_step() for _ in range(2)]
    assert all(math.isfinite(r["loss"]) and r["supervised_tokens"] > 0 for r in records)
    assert run.sampler.generated > 0
    if mode != "on_policy":
        assert len(run.sampler.buffer) > 0
    run.save()
    state = run.sampler.state_dict()
    third, fourth = run.train_step(), run.train_step()

    again = Trainer(config(small_text, tmp_path / "run", f"sampling.mode={mode}", *GENERATION, *overrides,
                           "train.resume=true")).setup().resume()
    assert again.sampler.state_dict() == state
    resumed = [again.train_step(), again.train_step()]
    assert [r["loss"] for r in resumed] == pytest.approx([third["loss"], fourth["loss"]], rel=1e-6)
    assert [r["supervised_tokens"] for r in resumed] == [third["supervised_tokens"], fourth["supervised_tokens"]]
    assert again.sampler.state_dict() == run.sampler.state_dict()


@pytest.fixture(scope="module")
def small_shapes(synthetic_shards):
    return synthetic_shards(24, val_fraction=0.25)


@pytest.mark.slow
def test_vlm_pair_generates_from_the_prompt_with_its_images(small_shapes, tmp_path, one_process_group):
    """Composed VLMs (other image sizes and token counts on each side): the student generates from its
    prompt with the sample's images; the teacher scores the same completion after its own prompt."""
    from taid_vlm.config import load_config
    from tests.train_helpers import CONFIGS

    cfg = load_config(CONFIGS / "tiny_vlm.yaml", [
        f"data.train={small_shapes}/train", f"data.val={small_shapes}/val", "data.synthetic=null",
        f"output_dir={tmp_path / 'run'}", "train.total_steps=2", "train.eval_batches=1", "train.progress_bar=false",
        "train.tensorboard=false", "sampling.mode=on_policy", "sampling.lmbda=1.0", *GENERATION])
    run = Trainer(cfg).setup().resume()
    batch = next(iter(run.train_loader))
    (rebuilt,) = run.sampler.prepare_step([batch], step=0)
    s, model = batch["student"], run.student_model
    per_row = [int((r == model.image_token_id).sum()) // model.tokens_per_image for r in s["input_ids"]]
    assert s["pixel_values"].shape[0] == sum(per_row) > len(per_row)  # some rows hold two images
    first = [sum(per_row[:b]) for b in range(len(per_row))]
    for b, (n, at) in enumerate(zip(per_row, first)):  # each row alone, with its own images: the same completion
        prompt = s["input_ids"][b, : s["prompt_lengths"][b]].tolist()
        (alone,) = generate_completions(model, [prompt], batch["indices"][b:b + 1], [8], run.cfg.sampling,
                                        run.cfg.seed, run.sampler.pad["student"], run.device,
                                        s["pixel_values"][at:at + n])
        labels = rebuilt["student"]["labels"][b]
        assert labels[labels != -100].tolist() == alone
    assert torch.equal(rebuilt["teacher"]["loss_targets"], rebuilt["student"]["loss_targets"])
    assert rebuilt["teacher"]["pixel_values"] is batch["teacher"]["pixel_values"]
    assert math.isfinite(run.train_step()["loss"])
