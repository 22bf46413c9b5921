"""The `Engine` protocol: what the daemon and the sim evaluator call to turn an observation into actions.

An engine owns the model's preprocessing and action de-normalisation, so every backend (torch here,
onnxruntime and TensorRT in `edge_steer.export`) answers the same `predict(observation, instruction)`
with the same (chunk, action_dim) array in robot units. Steering deltas switch at run time through
`set_steering`, without reloading the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Engine(Protocol):
    backend: str

    def predict(self, observation: Mapping[str, Any], instruction: str) -> np.ndarray:
        """observation: `observation.images.<cam>` uint8 HxWx3 + `observation.state` -> (chunk, action_dim)."""

    def metadata(self) -> dict[str, Any]:
        """Base model hash, steering hash, input/output shapes, preprocessing."""

    def set_steering(self, delta: Any | None) -> None:
        """Switch to a steering delta (a `SteeringDelta` or a path), or back to the base model with None."""


class TorchEngine:
    """The reference backend: the PyTorch model itself (no export step)."""

    backend = "torch"

    def __init__(self, model, steering=None):
        import torch

        self._torch = torch
        self.model = model.eval()
        self._base_fingerprint = model.fingerprint()
        self._base_state = {k: v.clone() for k, v in model.state_dict().items()}
        self._steering_hash: str | None = None
        if steering is not None:
            self.set_steering(steering)

    @classmethod
    def load(cls, path: str | Path | None = None, steering=None) -> "TorchEngine":
        from edge_steer.models import load_model
        return cls(load_model(path), steering)

    def predict(self, observation: Mapping[str, Any], instruction: str) -> np.ndarray:
        return self.model.predict(observation, instruction)

    def set_steering(self, delta) -> None:
        from edge_steer.steering.delta import SteeringDelta
        self.model.load_state_dict(self._base_state)        # steering never stacks on steering
        self._steering_hash = None
        if delta is None:
            return
        if not isinstance(delta, SteeringDelta):
            delta = SteeringDelta.load(delta)
        delta.apply_(self.model, self._base_fingerprint)
        self._steering_hash = delta.hash()

    def metadata(self) -> dict[str, Any]:
        c = self.model.config
        return {"backend": self.backend, "base_fingerprint": self._base_fingerprint,
                "steering_hash": self._steering_hash, "cameras": list(c.cameras), "image_size": c.image_size,
                "state_dim": c.state_dim, "chunk": c.chunk, "action_dim": c.action_dim}
