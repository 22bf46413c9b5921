"""The model protocol every stage uses (identify, finetune, deltas, report, export, eval, serve, bench).

Observations are dicts of numpy arrays keyed as in the dataset (`observation.images.<camera>` uint8
HxWx3, `observation.state`), instructions are strings, actions are chunks (chunk, action_dim) in
robot units (see `edge_steer.contract` for the action contract).

The graph is split in three stages so that identification can cache the trunk's input and rerun
only the layers after the one it ablates: `embed(**inputs) -> (x, mask)`, `trunk(x, mask, start,
stop)` over the layers that `heads()` numbers, and `readout(x)`. `forward(images, state, lang,
lang_mask)` is the three in a row, and is the pure-tensor graph an exporter traces. An adapter for
another VLA implements these methods; `docs/steering.md` ("Bring your own VLA") shows one for a
flow-matching action expert.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from edge_steer.data.schema import DatasetError
from edge_steer.models.heads import HeadSlices


@runtime_checkable
class VLAPolicy(Protocol):
    # config: a dataclass with at least cameras, state_dim, action_dim, chunk, max_lang_tokens
    config: Any

    def predict(self, observation: Mapping[str, Any], instruction: str) -> np.ndarray:
        """One observation (no batch dim) -> action chunk (chunk, action_dim) in robot units."""

    def prepare(self, batch: Mapping[str, Any], train: bool = False) -> dict[str, torch.Tensor]:
        """Preprocessing owned by the model (resize, normalise, encode the instruction): a raw batch ->
        the keyword inputs of `forward` / `embed` (images, state, lang, lang_mask)."""

    def encode_instructions(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The instruction-dependent entries of `prepare`'s output (lang, lang_mask) for other texts."""

    def action_target(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's demonstrated chunks in the units `readout` predicts, and (B, chunk) valid steps."""

    def action_error(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per-sample action error (B,): the model's own training loss (L1 for ours)."""

    def loss(self, batch: Mapping[str, Any], train: bool = True) -> torch.Tensor:
        """Scalar training loss of a dataset batch (observations, `action` chunks, `action_is_pad`, `task`)."""

    def embed(self, images: torch.Tensor, state: torch.Tensor, lang: torch.Tensor,
              lang_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> the trunk's input sequence (B, T, D) and its key mask (B, T), True where attended to."""

    def trunk(self, x: torch.Tensor, mask: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Layers [start, stop) of the trunk (the layers `heads()` numbers)."""

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk output -> the prediction (B, chunk, action_dim) that `action_error` scores."""

    @property
    def decision_slice(self) -> slice:
        """Token positions of the decision tokens (where the action is read out)."""

    def token_layout(self) -> dict[str, slice]:
        """Named token ranges: instruction, state, camera:<name> (patches, then extra tokens), decision."""

    def heads(self) -> list[HeadSlices]:
        """Every steerable attention head of the trunk, from the head locator."""

    def attention_maps(self, inputs: Mapping[str, torch.Tensor], layers: set[int]) -> dict[int, torch.Tensor]:
        """One forward; each named layer's attention weights (B, n_heads, T, T)."""

    def fingerprint(self) -> str:
        """Hash of the weights: steering deltas and exported engines refer to the base model by it."""

    def save_pretrained(self, directory: str | Path) -> Path: ...

    def export_preprocessing(self, engine_path: Path) -> dict[str, Any]:
        """What an exported engine needs to preprocess on the host without this model: writes the files
        it needs beside `engine_path` (a tokenizer) and returns the sidecar's `preprocessing` record
        (JSON; `files`: those files, relative to the engine's folder)."""

    # and a classmethod `host_preprocessor(model_config, preprocessing, normalisation, engine_path)
    # -> HostPreprocessor` that rebuilds it from the sidecar alone


@dataclass(frozen=True)
class HostPreprocessor:
    """An exported engine's host side, rebuilt from its sidecar: the model's config and `prepare`,
    raw batch (uint8 HWC images, state, instruction strings) -> the graph's inputs."""

    config: Any
    prepare: Callable[[Mapping[str, Any]], dict[str, torch.Tensor]]


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over parameter names, shapes and bytes: identifies the weights, not the file."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    return h.hexdigest()


def layer_count(heads: Sequence[HeadSlices]) -> tuple[int, int, int]:
    """(layers, heads per layer, head_dim) of a model's heads; score grids need the same count per layer."""
    n_layers = max(h.ref.layer for h in heads) + 1
    per = {layer: 0 for layer in range(n_layers)}
    for h in heads:
        per[h.ref.layer] += 1
    if len(set(per.values())) != 1:
        raise ValueError(f"heads per layer differ ({sorted(set(per.values()))}): scores need one grid")
    return n_layers, per[0], heads[0].head_dim


def ensemble_actions(actions: list[np.ndarray], decay: float) -> np.ndarray:
    """ACT's temporal ensemble: the actions that overlapping chunks predicted for one time step, oldest
    chunk first, averaged with weights exp(-decay * i) (i = 0 the oldest), so the plan changes gradually
    instead of jumping at each new chunk."""
    w = np.exp(-decay * np.arange(len(actions)))
    return (w[:, None] * np.stack(actions)).sum(0) / w.sum()


def sequence_layout(lang_tokens: int, cameras: Sequence[str], per_camera: int, chunk: int) -> dict[str, slice]:
    """Named token ranges of the sequence both reference VLAs build: the instruction, the state token, each
    camera's tokens in camera order, then the decision tokens (the action queries)."""
    out = {"instruction": slice(0, lang_tokens), "state": slice(lang_tokens, lang_tokens + 1)}
    for i, cam in enumerate(cameras):
        out[f"camera:{cam}"] = slice(lang_tokens + 1 + i * per_camera, lang_tokens + 1 + (i + 1) * per_camera)
    start = lang_tokens + 1 + len(cameras) * per_camera
    out["decision"] = slice(start, start + chunk)
    return out


def check_dataset(model, dataset) -> None:
    """Refuse demos the model cannot train or be scored on, before any work: the cameras it reads, the
    state and action dims against its config, and each camera's first frame of every episode against
    the image size info.json declares. Raises DatasetError with one line naming the mismatch."""
    c = model.config
    feats = dataset.spec.features
    need = [f"observation.images.{cam}" for cam in c.cameras] + ["observation.state", "action"]
    if missing := [k for k in need if k not in feats]:
        raise DatasetError(f"{dataset.root}: the demos lack {missing}, which the model reads")
    dims = {"state": (feats["observation.state"].shape[-1], c.state_dim),
            "action": (feats["action"].shape[-1], c.action_dim)}
    if bad := [f"{k} dim {have} (the model's is {want})" for k, (have, want) in dims.items() if have != want]:
        raise DatasetError(f"{dataset.root}: the demos have {' and '.join(bad)}; they were recorded for another "
                           "robot or model")
    try:
        dataset.check_frames()
    except DatasetError as e:
        raise DatasetError(f"{dataset.root}: {e}") from e
