"""A student as the standard Hugging Face model it is (or is equivalent to): ``(hf_model, processor)``.

- ``hf_vlm`` (a stock HF VLM behind the adapter): the wrapped model itself (``model.hf``), with the
  family's full processor when the adapter holds one as ``model.processor`` (a ``ProcessorMixin``:
  tokenizer + image processor + chat template); when ``model.processor`` is only an image processor
  (the fixed-size ``llava`` path), a ``LlavaProcessor`` is assembled from it and the tokenizer.
- ``composed``: the nearest stock class when every part maps exactly (export_llava.py), else
  ``NoStandardEquivalent`` saying which part does not.
``chat_template`` is the template training rendered with; it goes into the processor so that
``processor.apply_chat_template`` produces the token ids the student was trained on.
"""

from __future__ import annotations

from typing import Optional

from .export_llava import NoStandardEquivalent, composed_to_llava, llava_processor


def standard_hf_model(model, chat_template: Optional[str]):
    if model.kind == "hf_vlm":
        return _wrapped_hf_model(model, chat_template)
    if model.kind == "composed":
        return composed_to_llava(model, chat_template)
    raise NoStandardEquivalent(f"model type {model.kind!r} has no image-text-to-text export")


def _wrapped_hf_model(model, chat_template: Optional[str]):
    hf = model.hf
    hf.config.use_cache = True  # training switched the cache off; generation wants it
    text_cfg = hf.config.get_text_config()
    text_cfg.use_cache = True
    from transformers import ProcessorMixin

    processor = getattr(model, "processor", None)
    if isinstance(processor, ProcessorMixin):  # the family's full processor: saved as it is
        if chat_template is not None:
            processor.chat_template = chat_template
        return hf, processor
    if hf.config.model_type != "llava":
        raise NoStandardEquivalent(f"the {hf.config.model_type!r} adapter holds no full processor (model.processor "
                                   "is not a transformers ProcessorMixin)")
    vc = hf.config.vision_config
    has_cls = vc.model_type in ("clip_vision_model", "clip")
    processor = llava_processor(model.processor, model.tokenizer, model.input_spec.image_token, vc.patch_size,
                                hf.config.vision_feature_select_strategy, has_cls, chat_template,
                                model.tokens_per_image)
    return hf, processor
