"""open_clip vision towers: any open_clip model name or a custom vision config dict, weights from local files.

Only the vision half is built (no text tower). Blocks after the feature layer, the final norm and the
pooling projection are pruned with open_clip's own ``prune_intermediate_layers``: they never feed the LM,
and unused trainable parameters upset distributed optimizers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from .config_checks import check_keys
from .vision_encoder import VisionEncoder, check_feature_layer

KEYS = ("type", "model", "config", "embed_dim", "quick_gelu", "pretrained", "feature_layer", "drop_cls", "preprocess")
_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")


def build_open_clip_vision_tower(embed_dim: int, vision_cfg: dict, quick_gelu: bool):
    """The single place that touches open_clip's private vision-tower factory."""
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu)


def _vision_cfg_fields() -> set:
    from open_clip.model import CLIPVisionCfg

    return {f.name for f in dataclasses.fields(CLIPVisionCfg)}


def _weights_file(pretrained: str, where: str) -> Path:
    path = Path(pretrained.removeprefix("local-dir:")).expanduser()
    if path.is_dir():
        for name in _WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise ValueError(f"{where}: no weights file ({', '.join(_WEIGHT_FILES)}) in {str(path)!r}")
    if not path.is_file():
        raise ValueError(f"{where}: {pretrained!r} is not a local file or directory (no downloads at run time)")
    return path


def _load_tower_weights(tower, pretrained: str, where: str) -> None:
    from open_clip.factory import load_state_dict

    from .folder_checks import check_safetensors, reading_folder

    file = _weights_file(pretrained, where)
    if file.suffix == ".safetensors":
        check_safetensors(file, where)
    with reading_folder(where, file):  # a corrupt torch pickle: one line naming the file
        state = load_state_dict(str(file))
    if any(k.startswith("visual.") for k in state):  # a full CLIP checkpoint: keep the vision half
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    try:
        missing, unexpected = tower.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{where}: weights in {pretrained!r} do not fit the tower: {e}") from None
    if missing or unexpected:
        raise ValueError(f"{where}: weights in {pretrained!r} do not fit the tower: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")


class OpenClipVisionEncoder(VisionEncoder):
    def __init__(self, tower, layer: int, drop_cls: bool, preprocess: dict, export: dict):
        super().__init__()
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.tower = tower
        self.layer = layer
        self.drop_cls = drop_cls
        self.hidden_size = tower.transformer.width
        self.grid = tuple(tower.grid_size)
        self.image_size = tuple(tower.image_size)
        self.num_tokens = self.grid[0] * self.grid[1] + (0 if drop_cls else 1)
        self.preprocess = preprocess
        self.image_transform = image_transform_v2(PreprocessCfg(**preprocess), is_train=False)
        _register_direct_parameters(self, tower)
        self._export = export

    @classmethod
    def from_config(cls, cfg: dict, where: str) -> "OpenClipVisionEncoder":
        import open_clip
        from open_clip.transformer import VisionTransformer

        cfg = check_keys(cfg, KEYS, where)
        if (cfg.get("model") is None) == (cfg.get("config") is None):
            raise ValueError(f"{where}: set exactly one of 'model' (an open_clip model name) or 'config' "
                             "(a vision config dict)")
        preprocess_base: dict = {}
        if cfg.get("model") is not None:
            model_cfg = open_clip.get_model_config(cfg["model"])
            if model_cfg is None:
                raise ValueError(f"{where}.model: unknown open_clip model {cfg['model']!r}")
            vision_cfg = dict(model_cfg["vision_cfg"])
            embed_dim = cfg.get("embed_dim") or model_cfg["embed_dim"]
            quick_gelu = cfg.get("quick_gelu", model_cfg.get("quick_gelu", False))
            preprocess_base = dict(model_cfg.get("preprocess_cfg") or {})
        else:
            vision_cfg = check_keys(cfg["config"], _vision_cfg_fields(), f"{where}.config")
            embed_dim = cfg.get("embed_dim") or vision_cfg.get("width", 768)
            quick_gelu = bool(cfg.get("quick_gelu", False))
        if vision_cfg.get("patch_dropout", 0) > 0:
            raise ValueError(f"{where}: patch_dropout > 0 drops image tokens at random; the LM needs a fixed count")

        tower = build_open_clip_vision_tower(embed_dim, vision_cfg, quick_gelu)
        if not isinstance(tower, VisionTransformer):
            raise ValueError(f"{where}: only ViT towers give patch tokens here; got {type(tower).__name__}")
        if cfg.get("pretrained"):
            _load_tower_weights(tower, cfg["pretrained"], f"{where}.pretrained")
        layer = check_feature_layer(cfg.get("feature_layer", -2), len(tower.transformer.resblocks),
                                    f"{where}.feature_layer")
        tower.prune_intermediate_layers(indices=[layer], prune_norm=True, prune_head=True)
        tower.attn_pool = tower.attn_pool_contrastive = None  # pooling heads are never used for tokens

        from open_clip.transform import PreprocessCfg

        allowed = {f.name for f in dataclasses.fields(PreprocessCfg)} - {"size"}
        overrides = check_keys(cfg.get("preprocess"), allowed, f"{where}.preprocess")
        preprocess = {k: v for k, v in preprocess_base.items() if k in allowed}
        preprocess.update(overrides)
        preprocess["size"] = vision_cfg.get("image_size", 224)
        for k in ("mean", "std"):
            if k in preprocess:
                preprocess[k] = tuple(preprocess[k])
        drop_cls = bool(cfg.get("drop_cls", True))
        export = {"type": "open_clip", "config": vision_cfg, "embed_dim": embed_dim, "quick_gelu": quick_gelu,
                  "pretrained": None, "feature_layer": layer, "drop_cls": drop_cls,
                  "preprocess": {k: (list(v) if isinstance(v, tuple) else v)
                                 for k, v in preprocess.items() if k != "size"}}
        return cls(tower, layer, drop_cls, preprocess, export)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # forward_intermediates, not forward: ZeRO-3 gathers the tower's own parameters (class and
        # position embeddings) only because they are registered on this module (see __init__).
        out = self.tower.forward_intermediates(pixel_values, indices=[self.layer], intermediates_only=True,
                                               output_fmt="NLC", output_extra_tokens=not self.drop_cls)
        tokens = out["image_intermediates"][0]
        if not self.drop_cls:
            tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)
        return tokens

    def export_config(self) -> dict:
        return dict(self._export)


def _register_direct_parameters(owner: nn.Module, tower: nn.Module) -> None:
    """Let ZeRO-3 gather the parameters that open_clip uses outside their own module's forward().

    ZeRO-3 fetches a module's parameters when that module's forward() runs. Two kinds escape it here:
    the tower's direct parameters (class and position embeddings), used by forward_intermediates(),
    which is not the tower's forward(); and nn.MultiheadAttention's out_proj, whose weight the attention
    function reads without calling out_proj. Registered as external parameters of the module that
    does run, they are gathered with it. A no-op outside ZeRO-3.
    """
    try:
        import deepspeed
    except ImportError:  # DeepSpeed is optional for inference use of the models
        return
    for param in tower.parameters(recurse=False):
        deepspeed.zero.register_external_parameter(owner, param)
    for module in tower.modules():
        if isinstance(module, nn.MultiheadAttention):
            for param in module.out_proj.parameters():
                deepspeed.zero.register_external_parameter(module, param)
