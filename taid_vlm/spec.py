"""The narrow interface between a model and the data pipeline.

A model says how its inputs must be prepared (tokenizer, and for images either a fixed-size transform
with a fixed image-token count, or a processor that decides per image); the data pipeline renders
samples with it. Neither side imports the other: both depend only on this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

ImageTransform = Callable[[Any], torch.Tensor]  # PIL.Image -> float tensor [3, H, W]


@dataclass
class ImageInputs:
    """What a dynamic-resolution model expects for the images of ONE sample, as its own processor makes it.

    spans:   per image, the exact token ids that replace the image's placeholder token in the text
             (wrapper tokens included, e.g. vision start/end, tile or row/column tokens).
    tensors: the sample's model inputs for those images (pixel values of any shape, grid sizes, image
             sizes, patch masks); every tensor's dim 0 indexes images, patches or rows in image order,
             so a batch is their concatenation along dim 0 (other dims zero-padded to the largest).
    """

    spans: List[List[int]]
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)


# the PIL images of one sample, in order -> ImageInputs (raises ValueError for an image it cannot take)
ImageProcessor = Callable[[Sequence[Any]], ImageInputs]


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
    image_processor:   dynamic-resolution models (instead of image_transform/tokens_per_image): the
                       sample's images -> ImageInputs; each image_token in the rendered text is replaced
                       by that image's span.
    image_prompt:      the text that one image span replaces, wrapper tokens included (Qwen:
                       "<|vision_start|><|image_pad|><|vision_end|>"); None: image_token alone. A chat
                       template that reads list content writes it for each image item; the renderer
                       collapses it to image_token.
    """

    tokenizer: Any
    image_transform: Optional[ImageTransform] = None
    tokens_per_image: int = 0
    image_token_id: Optional[int] = None
    image_token: Optional[str] = None
    chat_template: Optional[str] = None
    image_processor: Optional[ImageProcessor] = None
    image_prompt: Optional[str] = None

    @property
    def is_multimodal(self) -> bool:
        return self.image_processor is not None or (self.image_transform is not None and self.tokens_per_image > 0)
