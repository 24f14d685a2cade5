"""The narrow interface between a model and the data pipeline.

A model says how its inputs must be prepared (tokenizer, image transform, image-token count); the data
pipeline renders samples with it. Neither side imports the other: both depend only on this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

ImageTransform = Callable[[Any], torch.Tensor]  # PIL.Image -> float tensor [3, H, W]


@dataclass(frozen=True)
class InputSpec:
    """How to prepare inputs for one model (teacher or student).

    tokenizer:         a Hugging Face tokenizer (PreTrainedTokenizerBase).
    image_transform:   PIL image -> [3, H, W] tensor; None for text-only models.
    tokens_per_image:  how many placeholder tokens one image occupies in the LM sequence (0: text-only).
    image_token_id:    id of the placeholder token that the model replaces by image embeddings.
    image_token:       its string form (e.g. "<image>"), as it appears in rendered text.
    chat_template:     Jinja chat template to render conversations with; None: use the tokenizer's own,
                       or the library's default ChatML template when the tokenizer has none.
    """

    tokenizer: Any
    image_transform: Optional[ImageTransform] = None
    tokens_per_image: int = 0
    image_token_id: Optional[int] = None
    image_token: Optional[str] = None
    chat_template: Optional[str] = None

    @property
    def is_multimodal(self) -> bool:
        return self.image_transform is not None and self.tokens_per_image > 0
