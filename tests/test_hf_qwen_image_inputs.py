"""The fast Qwen image path (models/hf_qwen_image_inputs.py) gives exactly what the family's own processor gives.

Exact, not within a tolerance: the fast path runs the processor's own resize kernel and the same float32
operations in the same order (x - 255 * mean, then / (255 * std)); only how the bytes are moved between
them differs, and moving bytes does not round."""

import io
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from taid_vlm.models.hf_families import FAMILIES
from taid_vlm.models.hf_image_processing import ProcessorImageInputs
from taid_vlm.models.hf_qwen_image_inputs import QwenImageInputs, fast_path_refusal, image_inputs_for
from taid_vlm.models.tiny_family_tokenizers import build_family_tokenizer

from hf_family_helpers import photo
from models_helpers import one_torch_thread  # noqa: F401

PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}


def processor(name: str, **image_processor):
    """The family's processor at its default resolution (Qwen2.5-VL: up to 1280 merged 28x28 patches)."""
    tok = build_family_tokenizer(name)
    geometry = SimpleNamespace(vision_config=SimpleNamespace(
        patch_size=PATCH[name], temporal_patch_size=2, spatial_merge_size=2))
    return FAMILIES[name].build_processor(tok, geometry, {**image_processor, "processor": {"chat_template": None}})


def jpeg_photo(height: int, width: int) -> Image.Image:
    """A real-size photo as the data side sees it: JPEG bytes decoded by PIL (4:2:0, odd sizes allowed)."""
    buf = io.BytesIO()
    photo(7, height, width).save(buf, format="JPEG", quality=90)
    img = Image.open(io.BytesIO(buf.getvalue()))
    img.load()
    return img


def assert_same(fast, reference, images):
    got, want = fast(images), reference(images)
    assert got.spans == want.spans
    assert sorted(got.tensors) == sorted(want.tensors)
    for key, value in want.tensors.items():
        assert got.tensors[key].dtype == value.dtype and torch.equal(got.tensors[key], value), key


def test_fast_path_equals_the_processor_on_a_real_size_photo():
    """The benchmark's case: a 1024x768 JPEG at Qwen2.5-VL's default resolution (756 x 1036, 999 tokens)."""
    proc = processor("qwen2_5_vl")
    prompt = FAMILIES["qwen2_5_vl"].image_prompt
    fast = image_inputs_for(proc, prompt)
    assert isinstance(fast, QwenImageInputs)
    assert_same(fast, ProcessorImageInputs(proc, prompt), [jpeg_photo(768, 1024)])
    assert fast([jpeg_photo(768, 1024)]).tensors["image_grid_thw"].tolist() == [[1, 54, 74]]


@pytest.mark.parametrize("name", sorted(PATCH))
def test_fast_path_equals_the_processor_on_images_of_every_shape(name):
    proc = processor(name, size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64})
    prompt = FAMILIES[name].image_prompt
    fast, reference = image_inputs_for(proc, prompt), ProcessorImageInputs(proc, prompt)
    assert isinstance(fast, QwenImageInputs)
    # one sample, several images: same-shape images are resized as one batch by the processor; a small
    # image is scaled up to min_pixels; one already at its target size is not resized at all
    exact = photo(4, 2 * 2 * PATCH[name], 3 * 2 * PATCH[name])
    assert_same(fast, reference, [photo(1, 57, 83), jpeg_photo(150, 201), photo(2, 57, 83), photo(3, 9, 30), exact])
    # a non-RGB image, and an input that is not a PIL image, go to the processor
    assert_same(fast, reference, [photo(5, 40, 60).convert("L")])
    assert_same(fast, reference, [np.asarray(photo(6, 40, 60))])
    assert fast([]).spans == [] and fast([]).tensors == {}


def test_fast_path_survives_pickling_into_a_worker_and_keeps_overrides():
    proc = processor("qwen2_5_vl", size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 64})
    fast = pickle.loads(pickle.dumps(image_inputs_for(proc, FAMILIES["qwen2_5_vl"].image_prompt)))
    assert isinstance(fast, QwenImageInputs)
    assert_same(fast, ProcessorImageInputs(proc, FAMILIES["qwen2_5_vl"].image_prompt), [jpeg_photo(300, 451)])
    assert fast([jpeg_photo(768, 1024)]).tensors["image_grid_thw"].prod() <= 4 * 64


def test_settings_the_fast_path_does_not_reproduce_go_to_the_processor():
    from transformers import Qwen2VLImageProcessorPil

    prompt = FAMILIES["qwen2_5_vl"].image_prompt
    assert fast_path_refusal(processor("qwen2_5_vl")) is None
    off = processor("qwen2_5_vl", do_normalize=False)
    assert "do_normalize" in fast_path_refusal(off)
    assert type(image_inputs_for(off, prompt)) is ProcessorImageInputs
    pil = processor("qwen2_5_vl")
    pil.image_processor = Qwen2VLImageProcessorPil(**pil.image_processor.to_dict())
    assert "Qwen2VLImageProcessorPil" in fast_path_refusal(pil)
    assert type(image_inputs_for(pil, prompt)) is ProcessorImageInputs
    assert fast_path_refusal(SimpleNamespace(image_processor=None)) is not None
