"""LoRA students (peft): adapters on the student's language model, set in its model file.

    lora:
      r: 16                      # rank
      alpha: 32                  # scale alpha / r
      dropout: 0.05
      target_modules: all-linear # or a list of module names (q_proj, v_proj, ...)
      train: [projector]         # components trained in full beside the adapters (default: none)
      save_adapter: false        # export also writes the adapter (OUT_DIR/adapter, PEFT format)

peft injects the adapters in place, so the model keeps its structure and every path of the code that
reads it (`llm.base_model`, `get_input_embeddings`, ...) stays as it was; the PeftModel that peft
returns is kept beside the model, not in its module tree (the state dict names the same parameters
as without it, plus the adapters). Everything but the adapters (and `train`) is frozen. Export merges
the adapters into the weights (peft's merge_and_unload), so the student leaves as its standard model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from .config_checks import check_keys

log = logging.getLogger("taid_vlm.models")

KEYS = ("r", "alpha", "dropout", "target_modules", "train", "save_adapter")
PEFT_MODEL = "_peft_model"  # the attribute of the DistillableModel holding peft's wrapper (outside the module tree)


def language_model(model):
    """The student's language model: `llm` of a causal LM or composed VLM, the HF VLM's `language_model`."""
    if model.kind == "hf_vlm":
        return model.hf.model.language_model
    return model.llm


def apply_lora(model, cfg: Any, where: str = "student.model.lora") -> None:
    """Put adapters on the language model, freeze everything else (except the `train` components)."""
    from peft import LoraConfig, get_peft_model

    cfg = check_keys(cfg, KEYS, where)
    if model.role != "student":
        raise ValueError(f"{where}: LoRA adapters are for the student (a {model.role} is frozen)")
    train = cfg.get("train") or []
    groups = model.components()
    for name in train:
        if name not in groups:
            raise ValueError(f"{where}.train: {name!r} is not a component (known: {', '.join(sorted(groups))})")
    try:
        config = LoraConfig(r=int(cfg.get("r", 8)), lora_alpha=float(cfg.get("alpha", 16)),
                            lora_dropout=float(cfg.get("dropout", 0.0)), bias="none",
                            target_modules=cfg.get("target_modules", "all-linear"))
        model.requires_grad_(False)
        peft_model = get_peft_model(language_model(model), config)
    except ValueError as e:  # e.g. target modules not found in the model
        raise ValueError(f"{where}: {e}") from None
    model.__dict__[PEFT_MODEL] = peft_model
    for name in train:
        for p in groups[name]:
            p.requires_grad_(True)
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA r %d alpha %g on %s: %d adapter parameters; %d of %d parameters train%s", config.r,
             config.lora_alpha, ", ".join(sorted(config.target_modules)) if not isinstance(config.target_modules, str)
             else config.target_modules, adapters, trainable, total, f" (also {', '.join(train)})" if train else "")


def has_lora(model) -> bool:
    return PEFT_MODEL in model.__dict__


class SavedAdapter:
    """The adapter as PEFT writes it (adapter_config.json + adapter_model.safetensors), taken before merging."""

    def __init__(self, peft_model):
        from peft import get_peft_model_state_dict

        self.config = peft_model.peft_config["default"]
        self.state = {k: v.detach().cpu().clone().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(str(folder))
        save_file(self.state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def merge_for_export(model) -> Optional[SavedAdapter]:
    """Merge the adapters into the weights, in place (the model becomes its standard architecture again).
    Returns the adapter when the model file asks for it too (`lora.save_adapter`), else None."""
    if not has_lora(model):
        return None
    peft_model = model.__dict__.pop(PEFT_MODEL)
    adapter = SavedAdapter(peft_model) if model.model_config["lora"].get("save_adapter") else None
    peft_model.merge_and_unload()
    model.model_config = {k: v for k, v in model.model_config.items() if k != "lora"}  # merged: a plain model
    return adapter
