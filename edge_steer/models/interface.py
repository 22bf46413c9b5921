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
