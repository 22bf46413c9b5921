"""HFVLA: a VLA built from transformers modules, steerable end to end like EdgeVLA.

A transformers vision tower (SigLIP, ViT or CLIP vision) turns each camera image into patch features,
a linear projector maps them into the backbone's width, and a transformers text / LM backbone (BERT /
MiniLM, Llama, Qwen2, Gemma, Mistral) mixes, bidirectionally, the sequence

    instruction tokens (L) | state token (1) | patches of each camera (P each) | action queries (chunk)

(the backbone's own token embeddings for the instruction, our state token and learned queries). A linear
head reads one action per query: a whole chunk per forward, trained with L1 on normalised actions,
as EdgeVLA (OpenVLA-OFT's parallel decoding). Only the first N backbone layers may be kept, as
SmolVLA does.

Steering acts on the backbone's heads (where the decision tokens are), found by the head locator;
the vision tower's heads can be located too (`locate_heads(model, under="vision")`) but have no
decision tokens to be scored at. Each tower is built from its config or loaded from a local
directory; a saved HFVLA holds every weight, both configs and its tokenizer, so loading it needs
neither the towers' directories nor a hub.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_steer.models.checkpoint import CheckpointError, checked_meta, load_weights, save_checkpoint
from edge_steer.models.configuration_hfvla import HFVLAConfig, Tower, TowerError
from edge_steer.models.heads import HeadSlices
from edge_steer.models.interface import sequence_layout, weights_fingerprint
from edge_steer.models.language import quiet_local_load
from edge_steer.models.locate import find_heads
from edge_steer.models.vla import masked_l1, normalised_target, predict_chunk, prepare_inputs

MODEL_TYPE = "hf_vla"
TOKENIZER_DIR = "tokenizer"
IMAGE_STD = 0.5        # images scaled to (x - 0.5) / 0.5, the [-1, 1] the vision towers expect


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


class TokenEncoder:
    """texts -> (ids (B, L) int64, mask (B, L) bool) with a local tokenizer; ids beyond the backbone's
    vocabulary (a tiny test backbone with the MiniLM tokenizer) wrap around. Cached per text."""

    def __init__(self, tokenizer_dir: str | Path, max_tokens: int, vocab_size: int):
        self.dir, self.max_tokens, self.vocab_size = Path(tokenizer_dir), max_tokens, vocab_size
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @cached_property
    def tokenizer(self):
        _offline()
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(self.dir, local_files_only=True)
        if tok.pad_token is None:         # decoder tokenizers often have none; padding is masked anyway
            tok.pad_token = tok.eos_token or tok.unk_token
        return tok

    def _one(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"instruction must be a non-empty string, got {text!r}")
        enc = self.tokenizer(text.strip().lower(), truncation=True, max_length=self.max_tokens,
                             padding="max_length", return_tensors="pt")
        return enc["input_ids"][0] % self.vocab_size, enc["attention_mask"][0].bool()

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        for t in texts:
            if t not in self._cache:
                self._cache[t] = self._one(t)
        out = [self._cache[t] for t in texts]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])

    def tokens(self, text: str) -> list[str]:
        ids = self.tokenizer(text.strip().lower(), truncation=True, max_length=self.max_tokens)["input_ids"]
        return [str(t) for t in self.tokenizer.convert_ids_to_tokens(ids)]


def _tower_config(d: Mapping[str, Any]):
    from transformers import AutoConfig
    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def _vision_class(model_type: str):
    import transformers
    return {"siglip": transformers.SiglipVisionModel, "siglip_vision_model": transformers.SiglipVisionModel,
            "clip": transformers.CLIPVisionModel, "clip_vision_model": transformers.CLIPVisionModel,
            "vit": transformers.ViTModel}[model_type]


def _build(config: dict, weights: str | None, vision: bool, impl: str) -> nn.Module:
    """A tower from its config (random init) or from the local directory of its weights."""
    _offline()
    from transformers import AutoModel
    cfg = _tower_config(config)
    kw = {}
    if cfg.model_type in ("bert", "vit"):
        kw["add_pooling_layer"] = False          # unused weights would sit in every delta and fingerprint
    if cfg.model_type == "siglip_vision_model":
        cfg.vision_use_head = False              # its pooling head is an nn.MultiheadAttention we do not need
    if weights is not None:
        cls = _vision_class(cfg.model_type) if vision else AutoModel
        try:
            with quiet_local_load():
                return cls.from_pretrained(weights, config=cfg, local_files_only=True, attn_implementation=impl, **kw)
        except (OSError, ValueError) as e:
            raise TowerError(f"cannot load the {'vision' if vision else 'backbone'} weights from {weights}: {e}") from None
    if vision:
        return _vision_class(cfg.model_type)(cfg, **kw) if kw else _vision_class(cfg.model_type)(cfg)
    return AutoModel.from_config(cfg, **kw)


class HFVLA(nn.Module):
    """See the module docstring. Build with `HFVLA.create(backbone, vision, ...)` (towers from names or
    directories) or `HFVLA(config)` (random init from configs); load with `from_pretrained`."""

    model_type = MODEL_TYPE          # what config.json records; `load_model` dispatches on it

    def __init__(self, config: HFVLAConfig, tokenizer_dir: str | Path | None = None,
                 towers: tuple[nn.Module, nn.Module] | None = None):
        super().__init__()
        self.config = c = config
        if towers is None:
            towers = (_build(c.vision, None, True, c.attn_implementation),
                      _build(c.backbone, None, False, c.attn_implementation))
        self.vision, self.backbone = towers
        for tower in (self.vision, self.backbone):
            tower.config._attn_implementation = c.attn_implementation
        layers = self._layers()
        if len(layers) != c.n_layers:
            raise CheckpointError(f"backbone has {len(layers)} layers, the config says {c.n_layers}")
        d, dv = self.backbone.config.hidden_size, self.vision.config.hidden_size
        self.vision_proj = nn.Linear(dv, d)
        self.camera_embed = nn.Parameter(torch.zeros(len(c.cameras), d))
        self.state_in = nn.Linear(c.state_dim, d)
        self.queries = nn.Parameter(torch.zeros(c.chunk, d))
        self.action_out = nn.Linear(d, c.action_dim)
        for p in (self.camera_embed, self.queries):
            nn.init.normal_(p, std=0.02)
        self.register_buffer("state_mean", torch.zeros(c.state_dim))
        self.register_buffer("state_std", torch.ones(c.state_dim))
        self.register_buffer("action_mean", torch.zeros(c.action_dim))
        self.register_buffer("action_std", torch.ones(c.action_dim))
        from edge_steer.models.language import minilm_dir
        self.encoder = TokenEncoder(tokenizer_dir or minilm_dir(), c.max_lang_tokens,
                                    self.backbone.config.vocab_size)

    @classmethod
    def create(cls, backbone: Tower, vision: Tower, backbone_layers: int | None = None, **kw) -> "HFVLA":
        """Towers from configs or local weights; keep only the first `backbone_layers` layers."""
        impl = kw.get("attn_implementation", "sdpa")
        vis = _build(vision.config, vision.weights, True, impl)
        bb = _build(backbone.config, backbone.weights, False, impl)
        layers = _layer_list(bb)
        n = backbone_layers or len(layers)
        if not 1 <= n <= len(layers):
            raise TowerError(f"--backbone-layers {n}: the backbone has {len(layers)} layers")
        del layers[n:]
        if getattr(bb.config, "layer_types", None):    # per-layer attention kinds (Qwen2, Gemma 2/3) must match
            bb.config.layer_types = bb.config.layer_types[:n]
        bb.config.num_hidden_layers = n
        # the tokenizer of the backbone's own directory when it has one, else MiniLM's (ids wrap)
        tok = backbone.weights if backbone.weights and any(
            (Path(backbone.weights) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")) else None
        config = HFVLAConfig(backbone=bb.config.to_dict(), vision=vis.config.to_dict(), **kw)
        return cls(config, tok, (vis, bb))

    @classmethod
    def from_names(cls, backbone: str, vision: str | None = None, backbone_layers: int | None = None,
                   **kw) -> "HFVLA":
        """Towers named (configuration_hfvla's registry) or local directories; the vision tower and layer
        count default to the backbone's usual ones (DEFAULT_VISION, DEFAULT_LAYERS). Raises TowerError."""
        from edge_steer.models.configuration_hfvla import DEFAULT_LAYERS, DEFAULT_VISION, backbone_tower, vision_tower

        return cls.create(backbone_tower(backbone), vision_tower(vision or DEFAULT_VISION.get(backbone, "siglip-small")),
                          backbone_layers or DEFAULT_LAYERS.get(backbone), **kw)

    # --- layout ------------------------------------------------------------------------------------
    def _layers(self) -> nn.ModuleList:
        return _layer_list(self.backbone)

    def token_layout(self) -> dict[str, slice]:
        c = self.config
        return sequence_layout(c.max_lang_tokens, c.cameras, c.patches_per_camera, c.chunk)

    @property
    def decision_slice(self) -> slice:
        return self.token_layout()["decision"]

    def heads(self) -> list[HeadSlices]:
        return find_heads(self, _layers_path(self.backbone, "backbone"))

    # --- the graph ---------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, state: torch.Tensor, lang: torch.Tensor,
                lang_mask: torch.Tensor) -> torch.Tensor:
        """images: (B, n_cams, 3, S, S) scaled to [-1, 1]; state: (B, state_dim) normalised; lang: (B, L)
        token ids; lang_mask: (B, L) bool. -> normalised chunk (B, chunk, action_dim). (EdgeVLA's signature.)"""
        x, mask = self.embed(images, state, lang, lang_mask)
        return self.readout(self.trunk(x, mask))

    def embed(self, images: torch.Tensor, state: torch.Tensor, lang: torch.Tensor,
              lang_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n_cam = images.shape[:2]
        feats = self.vision(pixel_values=images.flatten(0, 1)).last_hidden_state
        if self.config.vision["model_type"] in ("vit", "clip_vision_model", "clip"):
            feats = feats[:, 1:]                                  # the class token is not a patch
        patches = self.vision_proj(feats).reshape(b, n_cam, -1, self.queries.shape[-1])
        patches = (patches + self.camera_embed[:n_cam, None]).flatten(1, 2)
        if self.config.family == "bert":                          # word + position + type embeddings, LayerNorm
            text = self.backbone.embeddings(input_ids=lang)
        else:                                                     # (Gemma's scaling is inside its embedding)
            text = self.backbone.get_input_embeddings()(lang)
        dtype = patches.dtype
        x = torch.cat([text.to(dtype), self.state_in(state)[:, None].to(dtype), patches,
                       self.queries.to(dtype).expand(b, -1, -1)], 1)
        return x, torch.cat([lang_mask.bool(), lang_mask.new_ones(b, x.shape[1] - lang_mask.shape[1]).bool()], 1)

    def trunk(self, x: torch.Tensor, mask: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Backbone layers [start, stop), bidirectional over the unmasked tokens; the backbone's final
        norm after its last layer."""
        layers = self._layers()
        stop = len(layers) if stop is None else stop
        if self.backbone.config._attn_implementation == "eager":   # eager adds the mask to the scores
            m = torch.zeros(mask.shape, dtype=torch.float32, device=x.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        else:
            m = mask
        m = m[:, None, None, :]
        kw: dict[str, Any] = {}
        if self.config.family == "decoder":
            pos = torch.arange(x.shape[1], device=x.device)[None]
            kw = {"position_ids": pos, "position_embeddings": self.backbone.rotary_emb(x, pos)}
        for layer in layers[start:stop]:
            out = layer(x, attention_mask=m, **kw)
            x = out[0] if isinstance(out, tuple) else out
        if stop == len(layers) and self.config.family == "decoder":
            x = self.backbone.norm(x)
        return x

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        return self.action_out(x[:, -self.config.chunk:])

    # --- preprocessing, loss, prediction ------------------------------------------------------------
    def set_stats(self, stats: Mapping[str, Mapping[str, Sequence[float]]]) -> None:
        for key, prefix in (("action", "action"), ("observation.state", "state")):
            getattr(self, f"{prefix}_mean").copy_(torch.as_tensor(np.asarray(stats[key]["mean"], dtype=np.float32)))
            getattr(self, f"{prefix}_std").copy_(
                torch.as_tensor(np.asarray(stats[key]["std"], dtype=np.float32)).clamp_min(1e-3))

    def prepare(self, batch: Mapping[str, Any], train: bool = False) -> dict[str, torch.Tensor]:
        """Raw observation batch -> forward() inputs: EdgeVLA's preprocessing with images in [-1, 1]."""
        return prepare_inputs(self.config, batch, self.state_mean, self.state_std, self.encoder, train, IMAGE_STD)

    def encode_instructions(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        lang, lang_mask = self.encoder(list(texts))
        return {"lang": lang, "lang_mask": lang_mask}

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random forward() inputs of the right shapes and dtypes (what export traces with)."""
        c, g = self.config, torch.Generator().manual_seed(seed)
        mask = torch.zeros(batch, c.max_lang_tokens, dtype=torch.bool)
        mask[:, : max(1, c.max_lang_tokens // 2)] = True
        return {"images": torch.rand(batch, len(c.cameras), 3, c.image_size, c.image_size, generator=g) * 2 - 1,
                "state": torch.randn(batch, c.state_dim, generator=g),
                "lang": torch.randint(0, self.encoder.vocab_size, (batch, c.max_lang_tokens), generator=g),
                "lang_mask": mask}

    def export_preprocessing(self, engine_path: Path) -> dict[str, Any]:
        """The sidecar's record of the host side (the VLAPolicy protocol): the tokenizer is copied beside
        the engine (`<engine>.tokenizer/`), so serving needs neither this checkpoint nor MiniLM's package."""
        import shutil
        tok = Path(engine_path).with_name(Path(engine_path).name + ".tokenizer")
        if tok.exists():
            shutil.rmtree(tok)                 # a stale tokenizer of an earlier export to the same path
        self.encoder.tokenizer.save_pretrained(str(tok))
        return {"images": f"uint8 HWC -> float /255, bilinear antialiased resize to image_size, (x - 0.5) / {IMAGE_STD}, "
                          "cameras stacked in model_config.cameras order",
                "state": "(x - state_mean) / state_std",
                "language": "token ids of the tokenizer in `tokenizer` (lower-cased, padded to max_lang_tokens, "
                            "ids modulo vocab_size), on the host",
                "actions": "graph output * action_std + action_mean",
                "code": "edge_steer.models.vla.prepare_inputs / action_chunk",
                "tokenizer": tok.name, "vocab_size": self.encoder.vocab_size,
                "files": sorted(str(f.relative_to(tok.parent)) for f in tok.rglob("*") if f.is_file())}

    @classmethod
    def host_preprocessor(cls, model_config: Mapping[str, Any], preprocessing: Mapping[str, Any],
                          normalisation: Mapping[str, Sequence[float]], engine_path: Path):
        from edge_steer.models.interface import HostPreprocessor
        c = HFVLAConfig.from_dict(model_config)
        encoder = TokenEncoder(Path(engine_path).parent / preprocessing["tokenizer"], c.max_lang_tokens,
                               int(preprocessing["vocab_size"]))
        mean, std = (torch.as_tensor(np.asarray(normalisation[k], dtype=np.float32)) for k in ("state_mean", "state_std"))
        return HostPreprocessor(c, lambda batch: prepare_inputs(c, batch, mean, std, encoder, image_std=IMAGE_STD))

    def action_target(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return normalised_target(batch, self.config, self.action_mean, self.action_std)

    def action_error(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return masked_l1(pred.float(), target, valid, per_sample=True)

    def loss(self, batch: Mapping[str, Any], train: bool = True) -> torch.Tensor:
        target, valid = self.action_target(batch)
        pred = self(**self.prepare(batch, train=train))
        return masked_l1(pred.float(), target, valid)

    def predict(self, observation: Mapping[str, Any], instruction: str) -> np.ndarray:
        return predict_chunk(self, observation, instruction)

    @torch.no_grad()
    def attention_maps(self, inputs: Mapping[str, torch.Tensor], layers: set[int]) -> dict[int, torch.Tensor]:
        """Eager attention for this one forward (fused kernels return no weights); each named layer's
        attention module returns (output, weights), caught by a forward hook."""
        # the module that computes the weights is the parent of the q projection (self_attn, attention.self)
        attn = {h.ref.layer: self.get_submodule(h.q[0].param.rsplit(".", 2)[0]) for h in self.heads()
                if h.ref.layer in layers}
        seen: dict[int, torch.Tensor] = {}
        handles = [m.register_forward_hook(lambda _m, _a, out, k=k: seen.__setitem__(k, out[1].detach()))
                   for k, m in attn.items()]
        before = self.backbone.config._attn_implementation
        try:
            self.backbone.config._attn_implementation = "eager"
            self(**inputs)
        finally:
            self.backbone.config._attn_implementation = before
            for h in handles:
                h.remove()
        return seen

    # --- persistence -------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        return weights_fingerprint(self)

    def save_pretrained(self, directory: str | Path) -> Path:
        d = Path(directory)
        self.encoder.tokenizer.save_pretrained(str(d / TOKENIZER_DIR))
        return save_checkpoint(self, d, self.model_type, asdict(self.config), self.fingerprint())

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "HFVLA":
        d = Path(directory)
        meta = checked_meta(d, cls.model_type)
        try:
            model = cls(HFVLAConfig.from_dict(meta["config"]), d / TOKENIZER_DIR)
        except TowerError as e:
            raise CheckpointError(f"{d}: {e}") from None
        return load_weights(model, d)


def _layers_path(backbone: nn.Module, prefix: str) -> str:
    return f"{prefix}.encoder.layer" if hasattr(backbone, "encoder") and hasattr(backbone.encoder, "layer") \
        else f"{prefix}.layers"


def _layer_list(backbone: nn.Module) -> nn.ModuleList:
    return backbone.get_submodule(_layers_path(backbone, "")[1:])
