"""Every file under configs/ builds and trains one optimizer step.

Training recipes run the real trainer in this process for one step on synthetic shards. Models the
recipes load from local folders (``path:``, ``saved:``) are replaced by config-only tiny models of the
same architecture and geometry (patch size, image size, projector, tokenizer kind): STAND_INS maps the
path as written in the recipe to the builder of its stand-in. A new recipe that loads a new path fails
test_every_loaded_path_has_a_stand_in until an entry is added here.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch
import yaml

from taid_vlm.config import load_config
from taid_vlm.models import build_model

from models_helpers import interleaved_batch
from test_hf_recipes import RECIPES as HF_FAMILY_RECIPES  # built there, with tiny models of their HF family

# The trainer runs in this process: one_process_group (conftest) restores the environment after the module.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_process_group")]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FILES = sorted(p for p in CONFIGS.rglob("*") if p.is_file())


def _kind(path: Path) -> str:
    if path.suffix == ".json":
        return "deepspeed"
    if path.suffix not in (".yaml", ".yml"):
        return "unknown"
    raw = yaml.safe_load(path.read_text())
    if "study" in raw:
        return "study"
    if "type" in raw:
        return "model"
    return "recipe"


def _by_kind(kind: str):
    return [pytest.param(p, id=str(p.relative_to(CONFIGS))) for p in FILES if _kind(p) == kind]


def _hf_family_recipe(path: Path) -> bool:
    """Recipes of native HF VLM families run one step in tests/test_hf_recipes.py instead."""
    return path.parent == CONFIGS and path.name in HF_FAMILY_RECIPES


# ---- stand-ins for path-loaded models -------------------------------------------------------------

def _tokenizer_folder(root: Path) -> str:
    """The tiny tokenizer saved as a Hugging Face folder: loaded through `tokenizer: {path: ...}`."""
    from taid_vlm.tokenizer import build_tiny_tokenizer

    out = root / "tokenizer"
    if not out.is_dir():
        build_tiny_tokenizer(save_dir=out)
    return str(out)


def _qwen2_folder(root: Path, name: str, hidden: int, layers: int) -> str:
    """A Qwen2 causal LM folder (with its tokenizer), as `llm: {path: ...}` / `tokenizer: {path: ...}` load."""
    return _qwen2_with_tokenizer(root / name, _tokenizer_folder(root), hidden_size=hidden,
                                 intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=True)


def _qwen2_with_tokenizer(out: Path, tokenizer_dir: str, **geometry) -> str:
    """A seeded random Qwen2ForCausalLM of ``geometry`` saved with the tokenizer of ``tokenizer_dir`` (once)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if not out.is_dir():
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        cfg = Qwen2Config(**geometry, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        Qwen2ForCausalLM(cfg).save_pretrained(out)
        tok.save_pretrained(out)
    return str(out)


SIGLIP_384_14 = {"model_type": "siglip_vision_model", "image_size": 384, "patch_size": 14, "hidden_size": 32,
                 "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def _siglip_384_folder(root: Path) -> str:
    """SigLIP-so400m-patch14-384's geometry (384 px, patch 14: a 27 x 27 grid), tiny width."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    out = root / "siglip-384-14"
    if not out.is_dir():
        conf = {k: v for k, v in SIGLIP_384_14.items() if k != "model_type"}
        torch.manual_seed(0)
        SiglipVisionModel(SiglipVisionConfig(**conf)).save_pretrained(out)
        SiglipImageProcessor(size={"height": 384, "width": 384}).save_pretrained(out)
    return str(out)


def _saved_composed(root: Path, name: str, cfg: dict) -> str:
    """A taid-vlm model folder (save_pretrained), as `{saved: ...}` loads."""
    out = root / name
    if not out.is_dir():
        torch.manual_seed(0)
        build_model(cfg).save_pretrained(out)
    return str(out)


def _vlm_8b_teacher(root: Path) -> str:
    # as the recipe's comment describes it: SigLIP-so400m (384/14) + MLP + a Qwen2 LM, Qwen2 tokenizer kind
    return _saved_composed(root, "vlm-8b-teacher", {
        "type": "composed", "dtype": "bfloat16", "tokenizer": {"path": _tokenizer_folder(root)},
        "image_token": "<image>",
        "vision": {"type": "hf", "config": dict(SIGLIP_384_14), "feature_layer": -2},
        "projector": {"type": "mlp2x_gelu"},
        "llm": {"path": _qwen2_folder(root, "qwen2-teacher-llm", 96, 2), "attn_implementation": "sdpa"}})


def _text_bed_tokenizer(root: Path) -> str:
    """data_tools.text_corpus's tokenizer kind (byte-level BPE, 4096 tokens, the project's specials), trained on
    this repository's own Python source instead of the site-packages corpus the bed is built from."""
    from data_tools.text_corpus import train_tokenizer

    out = root / "text-bed-tokenizer"
    if not out.is_dir():
        sources = sorted((CONFIGS.parent / "taid_vlm").rglob("*.py"))
        train_tokenizer([p.read_text() for p in sources], 4096, out)
    return str(out)


def _text_bed_teacher(root: Path, size: str) -> str:
    """A text-bed teacher as `taid-vlm export` leaves it: a Qwen2 causal LM folder of the model file's geometry
    with the bed's tokenizer."""
    geometry = yaml.safe_load((CONFIGS / f"text_bed/models/teacher_{size}.yaml").read_text())["llm"]["config"]
    return _qwen2_with_tokenizer(root / f"text-bed-teacher-{size}", _text_bed_tokenizer(root),
                                 **{k: v for k, v in geometry.items() if k != "model_type"})


def _demo_teacher(root: Path) -> str:
    # the demo's teacher is configs/demo/models/teacher.yaml trained and exported by `taid-vlm demo`
    return _saved_composed(root, "demo-teacher", yaml.safe_load((CONFIGS / "demo/models/teacher.yaml").read_text()))


# path as written in a recipe -> builder of its stand-in (given a folder to write into)
STAND_INS: Dict[str, Callable[[Path], str]] = {
    "/models/Qwen2-72B-Instruct": lambda root: _qwen2_folder(root, "qwen2-72b", 96, 2),
    "/models/Qwen2-1.5B-Instruct": lambda root: _qwen2_folder(root, "qwen2-1.5b", 64, 2),
    "/models/siglip-so400m-patch14-384": _siglip_384_folder,
    "/models/vlm-8b-teacher": _vlm_8b_teacher,
    "../../runs/demo/teacher/model": _demo_teacher,
    "../../../data/text_bed/tokenizer": _text_bed_tokenizer,     # as the bed's model files under models/ write it
    "../../runs/text_bed/gap/teachers/m/model": lambda root: _text_bed_teacher(root, "m"),
}


def _loaded_paths(node, found=None) -> set:
    """Strings under `path:` / `saved:` keys anywhere in a raw config."""
    found = set() if found is None else found
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("path", "saved") and isinstance(v, str):
                found.add(v)
            else:
                _loaded_paths(v, found)
    elif isinstance(node, list):
        for v in node:
            _loaded_paths(v, found)
    return found


def _replace_paths(node, root: Path):
    if isinstance(node, dict):
        return {k: (STAND_INS[v](root) if k in ("path", "saved") and isinstance(v, str) else _replace_paths(v, root))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_paths(v, root) for v in node]
    return node


# ---- data ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(synthetic_shards) -> Dict[str, Path]:
    return {kind: synthetic_shards(48, val_fraction=0.25, text_only=text_only)
            for kind, text_only in (("shapes", False), ("shapes_text", True))}


@pytest.fixture(scope="module")
def stand_in_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stand_ins")


def _inline_model_files(raw: dict, base: Path) -> None:
    for role in ("student", "teacher"):
        model = (raw.get(role) or {}).get("model")
        if isinstance(model, str):
            raw[role]["model"] = yaml.safe_load((base / model).read_text())


# Batch shape is not geometry: one sample per micro-batch and two micro-batches (accumulation still runs)
# keep a step of the 2048 / 4096-token recipes cheap on a CPU.
CHEAP = ("train.micro_batch_size=1", "train.grad_accum=2")


def _one_step(raw: dict, base: Path, shards: Dict[str, Path], out: Path, root: Path, overrides=()) -> dict:
    from taid_vlm.train.trainer import train

    raw = copy.deepcopy(raw)
    _inline_model_files(raw, base)
    raw = _replace_paths(raw, root)
    raw["config_dir"] = str(base)
    data = shards["shapes_text" if raw.get("data", {}).get("text_only") else "shapes"]
    cfg = load_config(data=raw, overrides=[
        f"output_dir={out}", f"data.train={data}/train", f"data.val={data}/val", "data.synthetic=null",
        "data.num_workers=0", "train.total_steps=1", "train.eval_batches=1", "train.progress_bar=false",
        "train.tensorboard=false", *CHEAP, *overrides])
    train(cfg)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step1 = [r for r in logged if r.get("step") == 1 and "loss" in r]
    assert step1 and math.isfinite(step1[-1]["loss"]), logged
    return step1[-1]


# ---- the tests ----------------------------------------------------------------------------------

def test_every_file_is_covered_and_every_loaded_path_has_a_stand_in():
    kinds = {p: _kind(p) for p in FILES}
    unknown = [str(p) for p, kind in kinds.items() if kind == "unknown"]
    assert not unknown, f"configs/ holds files no test builds: {unknown}; teach tests/test_recipes_build.py their kind"
    for path, kind in kinds.items():
        if kind == "model" or (kind == "recipe" and not _hf_family_recipe(path)):
            missing = _loaded_paths(yaml.safe_load(path.read_text())) - set(STAND_INS)
            assert not missing, f"{path}: add a config-only stand-in for {sorted(missing)} to STAND_INS"


@pytest.mark.parametrize("path", [p for p in _by_kind("recipe") if not _hf_family_recipe(p.values[0])])
def test_recipe_trains_one_step(path, shards, stand_in_root, tmp_path):
    _one_step(yaml.safe_load(path.read_text()), path.parent, shards, tmp_path / "run", stand_in_root)


@pytest.mark.parametrize("path", _by_kind("deepspeed"))
def test_deepspeed_settings_train_one_step(path, shards, stand_in_root, tmp_path):
    stage = json.loads(path.read_text())["zero_optimization"]["stage"]
    raw = yaml.safe_load((CONFIGS / "tiny_text.yaml").read_text())
    _one_step(raw, CONFIGS, shards, tmp_path / "run", stand_in_root,
              [f"deepspeed.config_file={path}", f"deepspeed.zero_stage={stage}", "train.precision=bf16"])


@pytest.mark.parametrize("path", _by_kind("model"))
def test_model_file_builds_and_takes_one_optimizer_step(path, stand_in_root):
    model = build_model(_replace_paths(yaml.safe_load(path.read_text()), stand_in_root))
    model.train()
    if model.kind == "composed":
        ids, mask, pixels, _ = interleaved_batch(model)
    else:
        ids = torch.tensor([model.tokenizer.encode("a red circle and a blue square")])
        mask, pixels = torch.ones_like(ids), None
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    logits = model(ids, mask, pixel_values=pixels)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    assert math.isfinite(float(loss.detach()))
    assert any(not torch.equal(b, p) for b, p in zip(before, params))


@pytest.mark.parametrize("path", _by_kind("study"))
def test_study_config_builds_every_run_it_launches(path):
    from taid_vlm.experiments.compare import load_study

    study = load_study(path)
    for teacher in study["teachers"]:
        load_config(study["teacher_recipe"], [f"student.model={teacher['model']}",
                                              *teacher.get("overrides", []), *study.get("teacher_overrides", [])])
        load_config(study["distill"], [*study.get("overrides", []), "teacher.model={saved: /nonexistent}"])
