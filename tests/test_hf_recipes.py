"""The HF-family recipes (configs/*_to_*.yaml) run: each is loaded as written, every model is replaced
by a config-only tiny model of the same family and image geometry (patch, merge and tile sizes, image
sequence lengths, any-res pinpoints), and `taid-vlm train` runs one optimizer step on conversation shards."""

import copy

import pytest
import yaml

from taid_vlm.models.tiny_family_tokenizers import build_family_tokenizer

from hf_family_helpers import TEXT
from test_hf_families_pair import conversation_shard
from train_helpers import BIN, CONFIGS, run, step_losses

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
# model_type -> tiny config with the real model's image geometry
REAL_GEOMETRY = {
    "qwen2_5_vl": dict(
        text_config=dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e6}),
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1])),
    "internvl": dict(text_config=dict(TEXT, model_type="qwen2"), downsample_ratio=0.5, image_seq_length=256,
                     vision_config=dict(_VIT, image_size=[448, 448], patch_size=[14, 14])),
    "llava_onevision": dict(
        text_config=dict(TEXT, model_type="qwen2"), vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=[[384 * i, 384 * j] for i in range(1, 7)
                                                                  for j in range(1, 7)],
        vision_config=dict(_VIT, model_type="siglip_vision_model", image_size=384, patch_size=14,
                           vision_use_head=False)),  # as the real config: no pooling head (unused)
}
RECIPES = {"qwen2_5_vl_7b_to_3b.yaml": "qwen2_5_vl", "taid_vlm_2b.yaml": "internvl",
           "llava_onevision_7b_to_0p5b.yaml": "llava_onevision"}


def tiny(model: dict, model_type: str, tokenizer_dir) -> dict:
    """The recipe's model section with its weights folder swapped for a tiny config of the same family."""
    assert model["type"] == "hf_vlm" and model.get("path"), model
    out = {k: v for k, v in model.items() if k != "path"}
    out.update(config={"model_type": model_type, **copy.deepcopy(REAL_GEOMETRY[model_type])},
               tokenizer={"path": str(tokenizer_dir)}, dtype="float32")
    return out


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_runs_one_step_with_tiny_models_of_the_same_family(recipe, tmp_path):
    model_type = RECIPES[recipe]
    build_family_tokenizer(model_type, save_dir=tmp_path / "tok")
    shards = tmp_path / "shards"
    conversation_shard(shards / "shard-0.tar", 0, 4)
    raw = yaml.safe_load((CONFIGS / recipe).read_text())
    for role in ("teacher", "student"):
        raw[role]["model"] = tiny(raw[role]["model"], model_type, tmp_path / "tok")
    raw["data"].update(train=str(shards), val=str(shards), num_workers=0)
    raw["deepspeed"].pop("config_file", None)  # the bf16 GPU JSON; fp32 on the CPU
    raw["deepspeed"]["extra"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    raw["train"].update(total_steps=1, micro_batch_size=1, grad_accum=1, precision="fp32", eval_every=0,
                        save_every=0, log_every=1, progress_bar=False, tensorboard=False)
    raw["output_dir"] = str(tmp_path / "run")
    path = tmp_path / recipe
    path.write_text(yaml.safe_dump(raw))
    run([str(BIN / "taid-vlm"), "train", str(path), "--output-dir", str(tmp_path / "run")], timeout=1800)
    losses = step_losses(tmp_path / "run")
    assert list(losses) == [1] and losses[1] == losses[1]  # one finite step
