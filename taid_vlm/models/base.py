"""The interface every model (composed VLM, native HF VLM, text-only LM) exposes to the trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from taid_vlm.spec import InputSpec

from .config_checks import choose

ROLES = ("student", "teacher")


class DistillableModel(nn.Module):
    """Teacher or student.

    ``hidden_states(...)`` gives the lm_head input ``[B, T, H]``; ``output_weight()`` the lm_head weight
    ``[V, H]``; ``forward(...)`` is exactly ``hidden_states(...) @ output_weight().T``.
    """

    kind: str = ""

    def __init__(self, tokenizer, input_spec: InputSpec, config: dict):
        super().__init__()
        self.tokenizer = tokenizer
        self.input_spec = input_spec
        self.model_config = config  # the YAML-shaped config this model was built from (resolved)
        self.role = "student"

    # --- what subclasses implement ---------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                      pixel_values: Optional[torch.Tensor] = None,
                      position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def output_embeddings(self) -> nn.Module:
        raise NotImplementedError

    def generate_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        pixel_values: Optional[torch.Tensor] = None, **generate_kwargs) -> torch.Tensor:
        """The new tokens ``[B, N]`` that Hugging Face ``generate`` (KV cache) appends to the LEFT-padded
        prompts; ``generate_kwargs`` go to ``generate`` (generation_config, logits_processor)."""
        raise NotImplementedError(f"model type {self.kind!r} cannot generate yet (sampling.mode needs it)")

    def components(self) -> Dict[str, Iterable[nn.Parameter]]:
        """Named parameter groups that ``freeze`` may name."""
        raise NotImplementedError

    def export_config(self) -> dict:
        raise NotImplementedError

    def hf_config_beside_tokenizer(self):
        """The Hugging Face config that an export of this model writes next to its tokenizer: transformers
        picks the tokenizer class from its model_type when the folder is loaded."""
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------------
    def output_weight(self) -> torch.Tensor:
        return self.output_embeddings().weight

    @property
    def vocab_size(self) -> int:
        w = self.output_weight()
        return int(getattr(w, "ds_shape", w.shape)[0])  # ds_shape: the full shape under ZeRO-3

    @property
    def dtype(self) -> torch.dtype:
        return self.output_weight().dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.hidden_states(input_ids, attention_mask, pixel_values=pixel_values, position_ids=position_ids)
        return F.linear(h, self.output_weight())

    def freeze(self, names: Iterable[str], where: str = "model.freeze") -> None:
        groups = self.components()
        if isinstance(names, str) or not isinstance(names, (list, tuple)):
            raise ValueError(f"{where}: expected a list of component names from {sorted(groups)}, got {names!r}")
        for name in names:
            choose(name, groups, where, "component")
            for p in groups[name]:
                p.requires_grad_(False)

    def set_role(self, role: str, where: str = "role") -> None:
        self.role = choose(role, ROLES, where, "role")
        if role == "teacher":
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True):
        # a teacher stays in eval mode (no dropout) whatever the trainer calls
        return super().train(mode and self.role != "teacher")

    def save_pretrained(self, directory: Union[str, Path], state_dict: Optional[dict] = None) -> None:
        """Write the model atomically; ``state_dict`` (e.g. gathered from ZeRO-3) overrides the live weights."""
        from .saving import save_model

        save_model(self, directory, state_dict=state_dict)


def check_image_count(input_ids: torch.Tensor, image_token_id: int, tokens_per_image: int,
                      num_images: int) -> torch.Tensor:
    """Mask of the placeholder positions; ValueError naming both counts if they do not match the images."""
    mask = input_ids == image_token_id
    n_placeholders = int(mask.sum())
    expected = num_images * tokens_per_image
    if n_placeholders != expected:
        raise ValueError(
            f"image placeholders and images do not match: {n_placeholders} placeholder tokens (id {image_token_id}) "
            f"in input_ids, but {num_images} images x {tokens_per_image} tokens per image = {expected}")
    return mask


def distributed_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
