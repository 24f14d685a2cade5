"""`taid-vlm export CHECKPOINT OUT_DIR [--overwrite]`: the trained student as a standard Hugging Face folder.

What OUT_DIR holds:
- text-only student: a plain transformers causal LM + tokenizer (``AutoModelForCausalLM.from_pretrained``);
- ``hf_vlm`` student: the same HF class it was trained as, with its processor;
- composed student whose parts have a stock equivalent (HF CLIP/SigLIP tower + linear/mlp2x_gelu
  projector + HF causal LM): a Llava folder (``AutoModelForImageTextToText`` + ``AutoProcessor``);
- any other composed student: a warning that says which part has no standard equivalent, and the
  taid-vlm format (``taid_vlm.models.load_model(OUT_DIR)``; its ``llm/`` is a transformers causal LM).

The folder is written beside OUT_DIR and renamed into place at the end (a crash leaves no half-written
OUT_DIR); a non-empty OUT_DIR is refused unless ``overwrite`` (then replaced, never merged); files get
the umask's permissions. ZeRO-1/2/3 checkpoints are consolidated from their fp32 partitions with
DeepSpeed's own zero_to_fp32; ZeRO-0 checkpoints hold the module state directly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Tuple

import torch

from taid_vlm.errors import UserError
from taid_vlm.folders import DestinationError, check_destination, staged_folder

from .checkpoint import resolve_checkpoint
from .launch_env import import_deepspeed

log = logging.getLogger("taid_vlm.export")

FORMAT_CAUSAL_LM = "transformers causal LM"
FORMAT_HF_VLM = "transformers image-text-to-text"
FORMAT_TAID = "taid-vlm"


class ExportError(UserError, ValueError):
    """A user error in an export request; the message is one line: ``<what> (<where>)``."""


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
    raise ExportError(f"no DeepSpeed model states in the checkpoint folder ({checkpoint})")


def _resolve(checkpoint: Path) -> Path:
    try:
        return resolve_checkpoint(Path(checkpoint))
    except FileNotFoundError:
        raise ExportError(f"no complete checkpoint: expected a run folder, its checkpoints/ folder or a step "
                          f"folder holding COMPLETE ({checkpoint})") from None


def load_student(checkpoint: Path) -> Tuple[object, Path]:
    """(the student with its trained weights, the step folder they came from)."""
    from taid_vlm.models import build_model

    checkpoint = _resolve(checkpoint)
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
        raise ExportError(f"student weights missing from the checkpoint, e.g. {sorted(set(missing) - tied)[:3]} "
                          f"({checkpoint})")
    student.load_state_dict({k: v.to(reference[k].dtype) for k, v in state.items() if k in reference}, strict=False)
    student.eval()
    return student, checkpoint


def training_chat_template(student) -> str:
    """The chat template the data pipeline rendered this student's conversations with."""
    from taid_vlm.data.render import resolve_template

    return resolve_template(student.input_spec)


def write_student(student, out_dir: Path, overwrite: bool = False, protect: tuple = ()) -> str:
    """Write ``student`` to ``out_dir`` (see the module docstring); returns the format written."""
    from taid_vlm.models.hf_export import NoStandardEquivalent, standard_hf_model
    from taid_vlm.models.io import write_model_files
    from taid_vlm.models.lora import merge_for_export

    out_dir = Path(out_dir)
    try:
        check_destination(out_dir, overwrite, protect)
    except DestinationError as e:
        raise ExportError(str(e)) from None
    adapter = merge_for_export(student)  # a LoRA student leaves merged, as its standard model
    template = training_chat_template(student)
    hf_model = processor = None
    if student.kind != "causal_lm":
        try:
            hf_model, processor = standard_hf_model(student, template)
        except NoStandardEquivalent as e:
            log.warning("the student cannot leave as a standard Hugging Face model: %s; writing the taid-vlm format "
                        "instead (load it with taid_vlm.models.load_model; its llm/ folder is a transformers "
                        "causal LM)", e)
    try:
        with staged_folder(out_dir, overwrite, protect) as stage:
            if adapter is not None:
                adapter.save(stage / "adapter")
            if student.kind == "causal_lm":
                if getattr(student.tokenizer, "chat_template", None) is None:
                    student.tokenizer.chat_template = template
                student.llm.config.use_cache = True  # training switched the cache off; generation wants it
                student.llm.save_pretrained(str(stage))
                student.tokenizer.save_pretrained(str(stage))
                fmt = FORMAT_CAUSAL_LM
            elif hf_model is not None:
                hf_model.save_pretrained(str(stage))
                processor.save_pretrained(str(stage))
                fmt = FORMAT_HF_VLM
            else:
                write_model_files(student, stage)
                fmt = FORMAT_TAID
            check_exported_tokenizer(student.tokenizer, stage, fmt, out_dir)
            return fmt
    except DestinationError as e:
        raise ExportError(str(e)) from None


def check_exported_tokenizer(tokenizer, folder: Path, fmt: str, out_dir: Path) -> None:
    """The folder's tokenizer, loaded as its users load it (AutoProcessor for a VLM, AutoTokenizer otherwise),
    must read the probe texts as the trained student did; else the export is refused and nothing is written."""
    from transformers import AutoProcessor, AutoTokenizer

    from taid_vlm.models.tokenization_check import describe_tokenizer, first_difference

    if fmt == FORMAT_HF_VLM:
        reloaded = AutoProcessor.from_pretrained(str(folder)).tokenizer
    else:
        reloaded = AutoTokenizer.from_pretrained(str(folder / "llm" if fmt == FORMAT_TAID else folder))
    diff = first_difference(tokenizer, reloaded, add_special_tokens=(False, True))
    if diff is not None:
        raise ExportError(f"the exported folder would tokenize differently from the trained student: "
                          f"{diff.describe('the student ' + describe_tokenizer(tokenizer), 'the folder ' + type(reloaded).__name__)}; "
                          "nothing was written", str(out_dir))


def export_student(checkpoint: Path, out_dir: Path, overwrite: bool = False) -> Path:
    out_dir = Path(out_dir)
    checkpoint = _resolve(checkpoint)
    try:  # before the (slow) load: a refused destination costs nothing
        check_destination(out_dir, overwrite, protect=(checkpoint,))
    except DestinationError as e:
        raise ExportError(str(e)) from None
    student, checkpoint = load_student(checkpoint)
    import_deepspeed()  # save_pretrained imports deepspeed (accelerate's unwrap): without its mlflow import
    fmt = write_student(student, out_dir, overwrite, protect=(checkpoint,))
    log.info("exported the student of %s to %s (%s format)", checkpoint, out_dir, fmt)
    return out_dir
