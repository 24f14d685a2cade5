"""A student as the standard Hugging Face model it is (or is equivalent to): ``(hf_model, processor)``.

- ``hf_vlm`` (a stock HF VLM behind the adapter): the wrapped model itself (``model.hf``), with the
  family's full processor. An adapter that holds one exposes it as ``model.hf_processor`` (a
  ``ProcessorMixin``: tokenizer + image processor + chat template); for ``llava`` without one, a
  ``LlavaProcessor`` is assembled from the adapter's image processor and tokenizer.
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
    processor = getattr(model, "hf_processor", None)
    if processor is not None:
        if chat_template is not None:
            processor.chat_template = chat_template
        return hf, processor
    if hf.config.model_type != "llava":
        raise NoStandardEquivalent(f"the {hf.config.model_type!r} adapter exposes no processor (model.hf_processor)")
    vc = hf.config.vision_config
    has_cls = vc.model_type in ("clip_vision_model", "clip")
    processor = llava_processor(model.processor, model.tokenizer, model.input_spec.image_token, vc.patch_size,
                                hf.config.vision_feature_select_strategy, has_cls, chat_template,
                                model.tokens_per_image)
    return hf, processor
