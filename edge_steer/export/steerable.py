"""Host arrays of the steerable weights an exported engine takes as inputs, and delta switching.

A switch restores the slices the previous delta wrote (from the base values) and writes the new
delta's slices in place. The arrays stay the same objects, so a backend that bound them once (an
onnxruntime feed, a pinned buffer copied to the GPU) sees the change without rebinding; the cost is
proportional to the slices a delta changes, not to the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_steer.export.metadata import SteerableSpec
from edge_steer.steering.delta import DeltaError, SteeringDelta


class SteerableWeights:
    def __init__(self, specs: list[SteerableSpec], base: dict[str, np.ndarray], base_fingerprint: str,
                 projections: str = ""):
        self.specs = {s.param: s for s in specs}
        missing = set(self.specs) - set(base)
        if missing:
            raise DeltaError(f"base weights lack steerable parameters {sorted(missing)[:3]}")
        self.base = {k: np.ascontiguousarray(base[k], dtype=np.float32) for k in self.specs}
        self.live = {k: v.copy() for k, v in self.base.items()}        # what the engine reads
        self.base_fingerprint = base_fingerprint
        self.projections = projections
        self._written: list[tuple[str, int, np.ndarray]] = []        # slices the current delta wrote
        self.steering_hash: str | None = None

    @classmethod
    def from_file(cls, specs: list[SteerableSpec], path: str | Path, base_fingerprint: str,
                  projections: str = "") -> "SteerableWeights":
        from safetensors.numpy import load_file
        return cls(specs, load_file(str(path)), base_fingerprint, projections)

    def feeds(self) -> dict[str, np.ndarray]:
        """Graph input name -> live array."""
        return {s.input: self.live[p] for p, s in self.specs.items()}

    def set(self, delta: SteeringDelta | str | Path | None) -> list[str]:
        """Switch to `delta` (None: the base model). Returns the parameters whose arrays changed."""
        if delta is not None and not isinstance(delta, SteeringDelta):
            delta = SteeringDelta.load(delta)
        plan = self._plan(delta) if delta is not None else []     # validate fully before touching anything
        changed = {p for p, _, _ in self._written}
        for param, dim, idx in self._written:
            _put(self.live[param], dim, idx, _take(self.base[param], dim, idx))
        self._written = []
        for param, dim, idx, values in plan:
            _put(self.live[param], dim, idx, values)
            self._written.append((param, dim, idx))
            changed.add(param)
        self.steering_hash = delta.hash() if delta is not None else None
        return sorted(changed)

    def _plan(self, delta: SteeringDelta) -> list[tuple[str, int, np.ndarray, np.ndarray]]:
        delta.check_base(self.base_fingerprint)
        plan = []
        for (param, dim), (idx, values) in sorted(delta.tensors.items()):
            if param not in self.specs:
                raise DeltaError(f"the delta changes {param}, which this engine does not take as an input "
                                 f"(steerable projections: {self.projections or sorted(self.specs)}); re-export "
                                 f"with --steerable covering it, or bake the delta in with --steering")
            shape = list(self.base[param].shape)
            i = idx.numpy().astype(np.int64)
            v = values.detach().float().numpy()
            expect = shape.copy()
            expect[dim] = len(i)
            if dim not in (0, 1) or list(v.shape) != expect or (len(i) and (i.min() < 0 or i.max() >= shape[dim])):
                raise DeltaError(f"delta slice {param}|{dim} of shape {tuple(v.shape)} does not fit {tuple(shape)}")
            plan.append((param, dim, i, v))
        return plan


def _take(a: np.ndarray, dim: int, idx: np.ndarray) -> np.ndarray:
    return np.take(a, idx, axis=dim)


def _put(a: np.ndarray, dim: int, idx: np.ndarray, values: np.ndarray) -> None:
    if dim == 0:
        a[idx] = values
    else:
        a[:, idx] = values
