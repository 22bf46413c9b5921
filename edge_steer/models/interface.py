"""The model interface the rest of edge-steer uses; a public-VLA adapter implements the same.

Observations are dicts of numpy arrays keyed as in the dataset (`observation.images.<camera>` uint8
HxWx3, `observation.state`), instructions are strings, actions are chunks (chunk, action_dim) in
robot units (see `edge_steer.contract` for the action contract).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from edge_steer.data.schema import DatasetError
from edge_steer.models.heads import HeadSlices


@runtime_checkable
class VLAPolicy(Protocol):
    def predict(self, observation: Mapping[str, Any], instruction: str) -> np.ndarray:
        """One observation (no batch dim) -> action chunk (chunk, action_dim), de-normalised."""

    def loss(self, batch: Mapping[str, Any], train: bool = True) -> torch.Tensor:
        """Scalar training loss of a dataset batch (observations, `action` chunks, `action_is_pad`, `task`)."""

    def heads(self) -> list[HeadSlices]:
        """Every addressable attention head with its parameter slices and hook point."""

    def prepare(self, batch: Mapping[str, Any], train: bool = False) -> dict[str, torch.Tensor]:
        """Preprocessing owned by the model (resize, normalise, encode the instruction)."""

    def fingerprint(self) -> str:
        """Hash of the weights: steering deltas and exported engines refer to the base model by it."""

    def save_pretrained(self, directory: str | Path) -> Path: ...


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
