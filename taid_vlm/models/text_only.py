"""Text-only causal LMs behind the same interface (the LLM distillation path)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional

from torch import nn

from taid_vlm.spec import InputSpec

from .base import DistillableModel
from .language_model import decoder_hidden_states


class CausalLM(DistillableModel):
    kind = "causal_lm"

    def __init__(self, llm, tokenizer, config: dict):
        super().__init__(tokenizer, InputSpec(tokenizer=tokenizer), config)
        self.llm = llm

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, position_ids=None):
        if pixel_values is not None:
            raise ValueError("text-only model (type causal_lm) got pixel_values; it takes no images")
        embeds = self.llm.get_input_embeddings()(input_ids)
        return decoder_hidden_states(self.llm, embeds, attention_mask, position_ids)

    def output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def generate_tokens(self, input_ids, attention_mask, pixel_values=None, **generate_kwargs):
        if pixel_values is not None:
            raise ValueError("text-only model (type causal_lm) got pixel_values; it takes no images")
        out = self.llm.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        return out[:, input_ids.shape[1]:]

    def components(self) -> Dict[str, Iterable[nn.Parameter]]:
        return {"llm": list(self.llm.parameters()),
                "embeddings": list(self.llm.get_input_embeddings().parameters())}

    def hf_config_beside_tokenizer(self):
        return self.llm.config

    def export_config(self) -> dict:
        cfg = dict(self.model_config)
        cfg["tokenizer"] = {"path": "llm"}
        llm_cfg = {k: v for k, v in dict(cfg["llm"]).items() if k not in ("config", "path")}
        cfg["llm"] = {**llm_cfg, "path": "llm"}
        return cfg

    def write_weights(self, directory: Path, state_dict: Optional[dict]) -> None:
        llm_state = None
        if state_dict is not None:
            llm_state = {k[len("llm."):]: v for k, v in state_dict.items() if k.startswith("llm.")}
        self.llm.save_pretrained(str(directory / "llm"), state_dict=llm_state)
        self.tokenizer.save_pretrained(str(directory / "llm"))
