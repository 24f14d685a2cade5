"""Qwen2/2.5/3-VL image inputs made fast: the family processor's exact spans and tensors, in less time.

``ProcessorImageInputs`` runs the full HF processor per sample. For a Qwen image processor
(``Qwen2VLImageProcessor``, torchvision backend) on a 1024x768 photo most of its time is not the
arithmetic but the way to it (profiled in benchmarks/data_bench.py --qwen):

- the PIL image is copied twice (``convert_to_rgb``, ``np.array``) and made a contiguous CHW tensor,
  which the uint8 resize kernel then repacks to channels-last and back;
- the float image is patchified by a 9-d permute copy whose runs are 14 floats, at twice the size
  (the temporal patch is a copy of the image);
- the ~1,000-token prompt the processor wrote itself is tokenized again.

This path calls the processor's own ``resize`` (the same torchvision kernel) on a channels-last view of
the pixels, patchifies the uint8 image (whole patch rows, read as wider integers), then normalises with
the same float32 operations in the same order (``x - 255 * mean``, then ``/ (255 * std)``, as the
processor fuses rescale and normalise), the subtraction fused with the uint8 -> float32 transposing copy
and the division with the copy that duplicates the temporal patch; the span is
the prompt's prefix ids + one image token per merged patch + its suffix ids. The result is equal
element for element (tests/test_hf_qwen_image_inputs.py). Anything it does not reproduce exactly
(another processor class or backend, a setting switched off, an image that is not PIL RGB) goes to
the processor.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch

from .hf_image_processing import ProcessorImageInputs


def fast_path_refusal(processor) -> Optional[str]:
    """Why ``processor`` cannot take the fast path (None: it can)."""
    ip = getattr(processor, "image_processor", None)
    if type(ip).__name__ != "Qwen2VLImageProcessor" or getattr(ip, "backend", None) != "torchvision":
        return f"image processor {type(ip).__name__} (backend {getattr(ip, 'backend', None)!r})"
    if not (ip.do_resize and ip.do_rescale and ip.do_normalize):
        return "do_resize, do_rescale and do_normalize must all be on"
    if not (getattr(ip.size, "shortest_edge", None) and getattr(ip.size, "longest_edge", None)):
        return f"size {ip.size} lacks shortest_edge/longest_edge"
    return None


class QwenImageInputs(ProcessorImageInputs):
    """``ProcessorImageInputs`` for a Qwen image processor, equal output, faster (see the module doc)."""

    def __init__(self, processor, image_prompt: str, batched_keys=()):
        super().__init__(processor, image_prompt, batched_keys)
        ip = processor.image_processor
        self.patch, self.merge, self.temporal = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
        # the processor's fused rescale + normalise (TorchvisionBackend._fuse_mean_std_and_rescale_factor)
        self.mean = (torch.tensor(ip.image_mean) * (1.0 / ip.rescale_factor)).view(-1, 1)
        self.std = (torch.tensor(ip.image_std) * (1.0 / ip.rescale_factor)).view(-1, 1)
        tok = processor.tokenizer
        before, _, after = self.prompt.partition(processor.image_token)
        self.image_id = tok.convert_tokens_to_ids(processor.image_token)
        self.prefix = tok(before, add_special_tokens=False)["input_ids"] if before else []
        self.suffix = tok(after, add_special_tokens=False)["input_ids"] if after else []
        whole = tok(self.prompt, add_special_tokens=False)["input_ids"]
        if whole != self.prefix + [self.image_id] + self.suffix:
            raise ValueError(f"{self!r}: the image prompt does not tokenize around its image token")

    def __repr__(self) -> str:
        return f"QwenImageInputs({type(self.processor).__name__}, {self.prompt!r})"

    def __call__(self, images):
        from PIL import Image

        from taid_vlm.spec import ImageInputs

        images = list(images)
        if not images or not all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images):
            return super().__call__(images)
        pixels, grids, spans = [], [], []
        for im in images:
            patches, grid_h, grid_w = self.patchify(self.resized(im))
            pixels.append(patches)
            grids.append([1, grid_h, grid_w])
            n_tokens = grid_h * grid_w // self.merge ** 2
            spans.append(self.prefix + [self.image_id] * n_tokens + self.suffix)
        tensors = {"pixel_values": pixels[0] if len(pixels) == 1 else torch.cat(pixels),
                   "image_grid_thw": torch.tensor(grids, dtype=torch.long)}
        return ImageInputs(spans, tensors)

    def resized(self, image) -> torch.Tensor:
        """PIL RGB -> the processor's resized uint8 ``[1, 3, h, w]`` (channels-last: no repacking)."""
        with warnings.catch_warnings():  # a read-only view of PIL's bytes; nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            hwc = torch.from_numpy(np.asarray(image))
        ip = self.processor.image_processor
        chw = hwc.permute(2, 0, 1).unsqueeze(0)
        return ip.resize(chw, size=ip.size, resample=ip.resample, factor=self.patch * self.merge)

    def patchify(self, image: torch.Tensor):
        """uint8 ``[1, C, H, W]`` -> the processor's normalised ``[grid_h * grid_w, C * T * p * p]`` float32."""
        _, c, h, w = image.shape
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = h // p, w // p
        hwc = image[0].permute(1, 2, 0).contiguous()  # a view: the resize returns channels-last
        # patch order [h/m, w/m, m, m] with each patch's rows (p pixels x C bytes) kept whole, moved as
        # the widest integers that divide them: a few long runs instead of many runs of p floats
        word = next(k for k in (8, 4, 2, 1) if (p * c) % k == 0 and (w * c) % k == 0)
        wide = hwc.view(h, w * c).view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[word])
        rows = wide.view(gh // m, m, p, gw // m, m, p * c // word).permute(0, 3, 1, 4, 2, 5).contiguous()
        pixels = rows.view(torch.uint8).view(gh * gw, p * p, c).transpose(1, 2)  # channels first
        # float32(x) - mean, then / std: the processor's operations, each fused with a copy that is needed anyway
        centred = torch.sub(pixels, self.mean, out=torch.empty(gh * gw, c, p * p))
        out = torch.empty(gh * gw, c, t, p * p)
        torch.div(centred.unsqueeze(2).expand(-1, -1, t, -1), self.std.unsqueeze(-1), out=out)
        return out.view(gh * gw, c * t * p * p), gh, gw


def image_inputs_for(processor, image_prompt: str, batched_keys=()) -> ProcessorImageInputs:
    """The fast Qwen path where it reproduces ``processor`` exactly, else the processor itself."""
    if fast_path_refusal(processor) is None:
        try:
            return QwenImageInputs(processor, image_prompt, batched_keys)
        except ValueError:  # a prompt whose tokens merge across the image token: the processor decides
            pass
    return ProcessorImageInputs(processor, image_prompt, batched_keys)


__all__ = ["QwenImageInputs", "fast_path_refusal", "image_inputs_for"]
