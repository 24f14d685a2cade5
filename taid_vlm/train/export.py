"""`taid-vlm export CHECKPOINT OUT_DIR`: the trained student as a Hugging Face model folder.

ZeRO-1/2/3 checkpoints are consolidated from their fp32 partitions with DeepSpeed's own
zero_to_fp32; ZeRO-0 checkpoints hold the module state directly. Text-only students are written as a
plain transformers folder (AutoModelForCausalLM.from_pretrained(OUT_DIR)); VLM students in the
taid-vlm format (load_model(OUT_DIR)), whose llm/ subfolder is itself a transformers causal LM.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoint import resolve_checkpoint

log = logging.getLogger("taid_vlm.export")


def consolidated_student_state(checkpoint: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    if zero_stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    else:
        state = torch.load(_model_states_file(checkpoint), map_location="cpu", weights_only=False)["module"]
    prefix = "student."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _model_states_file(checkpoint: Path) -> Path:
    """Rank 0's DeepSpeed model-states file (mp_rank_00_... under ZeRO 0-2, zero_pp_rank_0_... under ZeRO-3)."""
    for pattern in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (checkpoint / pattern).is_file():
            return checkpoint / pattern
    raise FileNotFoundError(f"{checkpoint}: no DeepSpeed model states (not a DeepSpeed checkpoint?)")


def export_student(checkpoint: Path, out_dir: Path) -> Path:
    from taid_vlm.models import build_model

    checkpoint = resolve_checkpoint(Path(checkpoint))
    client = torch.load(_model_states_file(checkpoint), map_location="cpu", weights_only=False)
    # Only the two fields export needs are read back, so checkpoints outlive renames of other keys.
    saved = client["config"]
    student = build_model(saved["student"]["model"], role="student", where="student.model")
    state = consolidated_student_state(checkpoint, int(saved["deepspeed"]["zero_stage"]))
    reference = student.state_dict()
    missing = sorted(set(reference) - set(state))
    # Tied weights appear once in consolidated states; load_state_dict with strict=False accepts that,
    # but anything else missing is an error.
    tied = {k for k in missing if any(reference[k] is reference[o] or reference[k].data_ptr() == reference[o].data_ptr()
                                      for o in state if o in reference)}
    if set(missing) - tied:
        raise KeyError(f"{checkpoint}: student weights missing from the checkpoint: {sorted(set(missing) - tied)[:5]}")
    student.load_state_dict({k: v.to(reference[k].dtype) for k, v in state.items() if k in reference}, strict=False)
    out_dir = Path(out_dir)
    if student.kind == "causal_lm":
        out_dir.mkdir(parents=True, exist_ok=True)
        student.llm.save_pretrained(str(out_dir))
        student.tokenizer.save_pretrained(str(out_dir))
    else:
        student.save_pretrained(out_dir)
    log.info("exported the student of %s to %s", checkpoint, out_dir)
    return out_dir
