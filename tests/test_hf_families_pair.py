"""Teacher and student from different families sharing one vocabulary (item 4 of issue 10): a Qwen2.5-VL
teacher with an InternVL student, and with a composed SigLIP + Qwen2 student. Image spans differ in
length and wrapper tokens; the supervised text tokens still align exactly, and the student learns."""

import io
import json

import pytest
import torch

from taid_vlm.data import build_loader
from taid_vlm.losses import OnlineTeacher, build_loss
from taid_vlm.models import build_model

from data_helpers import write_tar
from hf_family_helpers import build_published_family_tokenizer, model_cfg, photo
from models_helpers import build_pair, one_torch_thread  # noqa: F401

ANSWERS = ["red circle on the left", "two blue squares", "a green star", "yes", "the yellow one is bigger"]


def jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def conversation_shard(path, first: int, n: int) -> str:
    samples = []
    for i in range(first, first + n):
        n_img = 1 + i % 3
        conv = [{"from": "human", "value": "<image>\n" * n_img + "What do you see?"},
                {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]},
                {"from": "human", "value": "Anything else?"}, {"from": "gpt", "value": ANSWERS[(i + 2) % 5]}]
        s = {"__key__": f"c{i:04d}", "json": json.dumps({"conversations": conv}).encode()}
        for k in range(n_img):
            s[f"{k}.jpg"] = jpeg(photo(10 * i + k, 40 + 13 * k, 70 - 11 * k))
        samples.append(s)
    return write_tar(path, samples)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    for fam in ("qwen2_5_vl", "internvl"):
        build_published_family_tokenizer(fam, root / fam)  # the families' published chat templates
    shards = [conversation_shard(root / f"shard-{k}.tar", 6 * k, 6) for k in range(2)]
    composed = {
        "type": "composed", "tokenizer": {"path": str(root / "qwen2_5_vl")}, "image_token": "<image>",
        "vision": {"type": "hf", "config": {"model_type": "siglip_vision_model", "hidden_size": 32,
                                            "intermediate_size": 64, "num_hidden_layers": 2,
                                            "num_attention_heads": 4, "image_size": 32, "patch_size": 8}},
        "projector": {"type": "mlp2x_gelu"},
        "llm": {"config": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}}}
    students = {"internvl": model_cfg("internvl", root / "internvl"), "composed": composed}
    return root, shards, sharp_teacher_folder(root), students


def sharp_teacher_folder(root) -> dict:
    """A tiny random Qwen2.5-VL saved as a stock HF folder (model + processor), its logits scaled up by
    its final norm so that its distribution has something to teach (a random tiny model is near uniform)."""
    torch.manual_seed(1)
    teacher = build_model(model_cfg("qwen2_5_vl", root / "qwen2_5_vl"))
    with torch.no_grad():
        teacher.hf.model.language_model.norm.weight.mul_(12.0)
    teacher.hf.save_pretrained(root / "teacher")
    teacher.processor.save_pretrained(root / "teacher")
    return {"type": "hf_vlm", "path": str(root / "teacher")}


def loader(shards, teacher, student, **kw):
    return build_loader(shards, student.input_spec, teacher.input_spec, mode="eval", batch_size=3, max_length=512,
                        num_workers=0, seed=0, **kw)


@pytest.mark.parametrize("student_name", ["internvl", "composed"])
def test_supervised_text_tokens_align_across_families(setup, student_name):
    _, shards, teacher_cfg, students = setup
    torch.manual_seed(0)
    teacher, student = build_pair(teacher_cfg, students[student_name])
    n_samples = 0
    for batch in loader(shards, teacher, student):
        s, t = batch["student"], batch["teacher"]
        assert torch.equal(s["loss_targets"], t["loss_targets"]) and len(s["loss_targets"]) > 0
        assert s["input_ids"].shape[1] != t["input_ids"].shape[1]  # other image spans, other lengths
        assert isinstance(t["pixel_values"], dict) and "image_grid_thw" in t["pixel_values"]
        # every supervised token is answer text or the end of a turn, in the same order on both sides
        text = student.tokenizer.decode(s["loss_targets"].tolist(), skip_special_tokens=True)
        for key in batch["keys"]:
            i = int(key[1:])
            assert ANSWERS[i % 5] in text and ANSWERS[(i + 2) % 5] in text
        with torch.no_grad():
            for model, inputs in ((student, s), (teacher, t)):
                logits = model(inputs["input_ids"], inputs["attention_mask"], pixel_values=inputs["pixel_values"])
                assert torch.isfinite(logits).all()
        n_samples += len(batch["keys"])
    assert n_samples == 12


def test_the_student_learns_from_a_teacher_of_another_family(setup):
    _, shards, teacher_cfg, students = setup
    torch.manual_seed(0)
    teacher, student = build_pair(teacher_cfg, students["internvl"])
    batches = list(loader(shards, teacher, student))
    loss_fn = build_loss("taid", t_start=0.4)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    student.train()

    def hidden(model, inputs):
        h = model.hidden_states(inputs["input_ids"], inputs["attention_mask"], pixel_values=inputs["pixel_values"])
        return h.reshape(-1, h.shape[-1]).index_select(0, inputs["loss_positions"])

    with torch.no_grad():
        teacher_hidden = [hidden(teacher, b["teacher"]) for b in batches]
    losses = []
    for epoch in range(6):
        total = 0.0
        for b, h_t in zip(batches, teacher_hidden):
            loss = loss_fn.fused(hidden(student, b["student"]), student.output_weight(),
                                 OnlineTeacher(h_t, teacher.output_weight()), labels=b["student"]["loss_targets"],
                                 chunk_size=16)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss)
        losses.append(total / len(batches))
    assert losses[-1] < 0.6 * losses[0], losses


def write_recipe(root, shards_dir, teacher_cfg, student_cfg, steps: int) -> str:
    import yaml

    recipe = {
        "seed": 0, "output_dir": str(root / "run"),
        "teacher": {"model": teacher_cfg, "placement": "zero3"}, "student": {"model": student_cfg},
        "data": {"train": str(shards_dir), "val": str(shards_dir), "max_length": 512, "num_workers": 0},
        "loss": {"name": "fkl"},  # a fixed target (TAID's t would climb to 1 within these few steps)
        "optim": {"lr": 5.0e-3, "weight_decay": 0.0, "schedule": "constant", "warmup_steps": 0, "grad_clip": 1.0},
        "deepspeed": {"zero_stage": 3, "extra": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
        "train": {"total_steps": steps, "micro_batch_size": 2, "grad_accum": 1, "precision": "fp32", "log_every": 1,
                  "eval_every": 0, "eval_batches": 0, "save_every": 0, "progress_bar": False, "tensorboard": False},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def held_out_ce_of_export(export, shards, vocab_size: int) -> tuple:
    """Stock transformers only (AutoModelForImageTextToText + AutoProcessor from the exported folder): the
    summed cross-entropy of the supervised tokens of every held-out sample, and their count. Which tokens
    are supervised (the assistant turns) comes from our rendering by the exported folder's own processor,
    whose ids must equal the stock processor's."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from taid_vlm.data import Renderer
    from taid_vlm.data.shard_io import read_shard
    from taid_vlm.data.samples import decode_sample
    from taid_vlm.data.skips import SkipCounter

    hf = AutoModelForImageTextToText.from_pretrained(str(export)).eval()
    processor = AutoProcessor.from_pretrained(str(export))
    renderer = Renderer(build_model({"type": "hf_vlm", "path": str(export)}).input_spec, 512)
    total, count, skips = 0.0, 0, SkipCounter()
    for shard in shards:
        for raw in read_shard(shard, skips):
            sample = decode_sample(raw)
            messages = [{"role": m["role"], "content": m["content"].replace("<image>", processor.image_token)}
                        for m in sample.messages]
            enc = processor(text=processor.apply_chat_template(messages, tokenize=False), images=sample.images,
                            return_tensors="pt")
            rendered = renderer(sample)
            assert enc["input_ids"][0].tolist() == rendered.input_ids, sample.key
            targets = torch.tensor(rendered.labels[1:])
            with torch.no_grad():
                logq = torch.log_softmax(hf(**enc).logits[0, :-1, :vocab_size].float(), -1)
            keep = targets != -100
            total += float(-logq[keep].gather(-1, targets[keep, None]).sum())
            count += int(keep.sum())
    assert skips.total == 0, skips.as_dict()
    return total, count, hf, processor


def assert_generates(hf, processor, shard) -> None:
    from taid_vlm.data.shard_io import read_shard
    from taid_vlm.data.samples import decode_sample
    from taid_vlm.data.skips import SkipCounter

    sample = decode_sample(next(read_shard(shard, SkipCounter())))
    prompt = [{"role": m["role"], "content": m["content"].replace("<image>", processor.image_token)}
              for m in sample.messages[:1]]
    enc = processor(text=processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                    images=sample.images, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=4, do_sample=False)
        first = int(hf(**enc).logits[0, -1].argmax())
    n = enc["input_ids"].shape[1]
    assert out.shape[1] > n and int(out[0, n]) == first


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_process_zero3_qwen_teacher_internvl_student_loss_falls_and_exports_to_stock_hf(setup, tmp_path):
    """Issue 10: the 2-process ZeRO-3 run's loss falls; the student exported by `taid-vlm export` loads with
    stock transformers, its held-out CE equals the run's final eval_student_ce (1e-5), and it generates."""
    from train_helpers import BIN, evals, run, step_losses
    from taid_vlm.train.launch_env import free_port

    root, shards, teacher_cfg, students = setup
    recipe = write_recipe(tmp_path, root, teacher_cfg, students["internvl"], steps=12)
    out = tmp_path / "z3"
    run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "taid_vlm.train",
         recipe, "--output-dir", str(out)], timeout=1800)
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, 13))
    first, last = sum(losses[s] for s in range(1, 5)) / 4, sum(losses[s] for s in range(9, 13)) / 4
    assert last < 0.7 * first, losses

    export = tmp_path / "export"
    run([str(BIN / "taid-vlm"), "export", str(out), str(export)], timeout=1800)
    final = evals(out)[12]  # the end-of-run eval over the whole held-out set, with the exported weights
    total, count, hf, processor = held_out_ce_of_export(export, shards, len(load_tokenizer(students)))
    assert type(hf).__name__ == "InternVLForConditionalGeneration"
    assert count == final["eval_tokens"], (count, final)
    print(f"held-out CE: run {final['eval_student_ce']:.7f}, stock HF export {total / count:.7f} ({count} tokens, "
          f"|diff| {abs(total / count - final['eval_student_ce']):.1e})")
    assert abs(total / count - final["eval_student_ce"]) <= 1e-5
    assert_generates(hf, processor, shards[0])


def load_tokenizer(students):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(students["internvl"]["tokenizer"]["path"])
