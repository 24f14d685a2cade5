"""Composed VLM: vision encoder -> projector -> image embeddings spliced into the LM's input embeddings.

The data pipeline has already expanded every image into ``tokens_per_image`` placeholder tokens; the
projected image tokens replace the embeddings at those positions, images in order of appearance
(sample-major, left to right), which is exactly the fill order of ``masked_scatter``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional

import torch
from torch import nn

from taid_vlm.spec import InputSpec

from .base import DistillableModel, check_image_count, distributed_world
from .language_model import decoder_hidden_states


class ComposedVLM(DistillableModel):
    kind = "composed"

    def __init__(self, vision, projector: nn.Module, llm, tokenizer, image_token: str, image_token_id: int,
                 config: dict):
        tokens_per_image = projector.num_output_tokens(vision.num_tokens)
        spec = InputSpec(tokenizer=tokenizer, image_transform=vision.image_transform,
                         tokens_per_image=tokens_per_image, image_token_id=image_token_id, image_token=image_token)
        super().__init__(tokenizer, spec, config)
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        # Under ZeRO-3 every rank must run the same modules (parameter gathers are collectives), so a batch
        # without images still runs the vision path on a blank image, with zero weight. None: only when
        # torch.distributed runs with more than one rank.
        self.run_vision_without_images: Optional[bool] = None

    # --- pieces --------------------------------------------------------------------------------------
    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[M, 3, H, W] -> [M, tokens_per_image, H_llm]"""
        dtype = next(self.vision.parameters()).dtype
        return self.projector(self.vision(pixel_values.to(dtype)))

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(input_ids)
        n_images = 0 if pixel_values is None else int(pixel_values.shape[0])
        mask = check_image_count(input_ids, self.image_token_id, self.tokens_per_image, n_images)
        if n_images:
            feats = self.image_embeddings(pixel_values).to(embeds.dtype)
            embeds = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), feats.reshape(-1, embeds.shape[-1]))
        elif self.run_vision_without_images or (self.run_vision_without_images is None and distributed_world() > 1):
            blank = torch.zeros(1, 3, *self.vision.image_size, device=embeds.device)
            embeds = embeds + 0.0 * self.image_embeddings(blank).sum().to(embeds.dtype)
        return embeds

    # --- interface -----------------------------------------------------------------------------------
    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, position_ids=None):
        embeds = self.embed_inputs(input_ids, pixel_values)
        return decoder_hidden_states(self.llm, embeds, attention_mask, position_ids)

    def output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def generate_tokens(self, input_ids, attention_mask, pixel_values=None, **generate_kwargs):
        # ids and the spliced embeddings both: generate then returns the prompt ids + the new tokens
        embeds = self.embed_inputs(input_ids, pixel_values)
        out = self.llm.generate(input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask,
                                **generate_kwargs)
        return out[:, input_ids.shape[1]:]

    def components(self) -> Dict[str, Iterable[nn.Parameter]]:
        return {"vision": list(self.vision.parameters()), "projector": list(self.projector.parameters()),
                "llm": list(self.llm.parameters()),
                "embeddings": list(self.llm.get_input_embeddings().parameters())}  # tied: lm_head too

    def hf_config_beside_tokenizer(self):
        # the taid-vlm format keeps the tokenizer in llm/ beside the LM's config; a Llava export is checked as written
        return self.llm.config

    def export_config(self) -> dict:
        cfg = dict(self.model_config)
        cfg["tokenizer"] = {"path": "llm"}
        cfg["vision"] = self.vision.export_config()
        llm_cfg = {k: v for k, v in dict(cfg["llm"]).items() if k not in ("config", "path")}
        cfg["llm"] = {**llm_cfg, "path": "llm"}
        return cfg

    def write_weights(self, directory: Path, state_dict: Optional[dict]) -> None:
        """LM as a standalone HF model (+ tokenizer) in ``llm/``; vision and projector in model.safetensors."""
        from safetensors.torch import save_file

        state = self.state_dict() if state_dict is None else state_dict
        llm_state = {k[len("llm."):]: v for k, v in state.items() if k.startswith("llm.")}
        rest = {k: v.detach().contiguous().cpu() for k, v in state.items() if not k.startswith("llm.")}
        self.llm.save_pretrained(str(directory / "llm"), state_dict=llm_state if state_dict is not None else None)
        self.tokenizer.save_pretrained(str(directory / "llm"))
        save_file(rest, str(directory / "model.safetensors"), metadata={"format": "pt"})
