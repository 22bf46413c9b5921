"""The steering delta: the few weight slices a steer fine-tune changed, and nothing else.

A delta file is safetensors. For every parameter the fine-tune touched it holds the parameter's new
values at the touched rows (dim 0) or columns (dim 1) and the indices of those rows/columns:

    "<param>|<dim>"      the new values, e.g. (n_rows, in_features) for q rows
    "<param>|<dim>|idx"  int64 indices along <dim>

and, in the header metadata, the base model's fingerprint, the selected heads (heads.json's
content) and the slices. The new values are stored, not differences: `apply` then reproduces the
fine-tuned weights bitwise, and an engine can switch tasks by writing slices.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_steer.files import atomic_write_bytes
from edge_steer.models.heads import ParamSlice

FORMAT = "edge-steer-delta/1"


class DeltaError(ValueError):
    pass


@dataclass
class SteeringDelta:
    base_fingerprint: str
    tensors: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]  # (param, dim) -> (idx, values)
    heads: dict[str, Any] = field(default_factory=dict)                # heads.json content
    slices: str = "qo"

    # --- building ---------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, slices: list[ParamSlice], base_fingerprint: str,
                   heads: Mapping[str, Any] | None = None, which: str = "qo") -> "SteeringDelta":
        """Read the current values of `slices` out of a (fine-tuned) model."""
        params = dict(model.named_parameters())
        idx: dict[tuple[str, int], list[int]] = {}
        for s in slices:
            if s.param not in params:
                raise DeltaError(f"the model has no parameter {s.param!r}")
            idx.setdefault((s.param, s.dim), []).extend(range(s.start, s.stop))
        tensors = {}
        for (name, dim), rows in idx.items():
            i = torch.tensor(sorted(set(rows)), dtype=torch.int64)
            tensors[(name, dim)] = (i, params[name].detach().index_select(dim, i).clone())
        return cls(base_fingerprint, tensors, dict(heads or {}), which)

    @property
    def num_values(self) -> int:
        return sum(v.numel() for _, v in self.tensors.values())

    def hash(self) -> str:
        """sha256 over names, indices and values: identifies the steering, not the file."""
        h = hashlib.sha256(self.base_fingerprint.encode())
        for (name, dim), (i, v) in sorted(self.tensors.items()):
            h.update(f"{name}|{dim}".encode())
            h.update(i.numpy().tobytes())
            h.update(v.detach().contiguous().float().numpy().tobytes())
        return h.hexdigest()

    # --- applying ---------------------------------------------------------------------------------
    def check_base(self, fingerprint: str) -> None:
        if fingerprint != self.base_fingerprint:
            raise DeltaError(f"this steering delta was trained on base model {self.base_fingerprint[:12]}, "
                             f"not on {fingerprint[:12]}: apply it to the model it came from")

    @torch.no_grad()
    def apply_(self, model: nn.Module, fingerprint: str | None = None) -> nn.Module:
        """Write the delta's slices into `model` in place (after checking it is the right base)."""
        self.check_base(fingerprint if fingerprint is not None else model.fingerprint())
        params = dict(model.named_parameters())
        for (name, dim), (i, v) in self.tensors.items():
            p = params.get(name)
            if p is None:
                raise DeltaError(f"the model has no parameter {name!r} that the delta changes")
            expect = list(p.shape)
            expect[dim] = len(i)
            if list(v.shape) != expect or (len(i) and int(i.max()) >= p.shape[dim]):
                raise DeltaError(f"delta slice {name}|{dim} of shape {tuple(v.shape)} does not fit {tuple(p.shape)}")
            p.index_copy_(dim, i, v.to(p.dtype))
        return model

    # --- files ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save
        path = Path(path)
        flat = {}
        for (name, dim), (i, v) in self.tensors.items():
            flat[f"{name}|{dim}"] = v.contiguous()
            flat[f"{name}|{dim}|idx"] = i.contiguous()
        meta = {"format": FORMAT, "base_fingerprint": self.base_fingerprint, "slices": self.slices,
                "heads": json.dumps(self.heads), "delta_hash": self.hash()}
        atomic_write_bytes(path, save(flat, metadata=meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SteeringDelta":
        from safetensors import SafetensorError, safe_open
        path = Path(path)
        if not path.is_file():
            raise DeltaError(f"no steering delta at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                flat = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise DeltaError(f"cannot read steering delta {path}: {e}") from None
        if meta.get("format") != FORMAT:
            raise DeltaError(f"{path} is not an edge-steer steering delta (format {meta.get('format')!r})")
        tensors = {}
        for key, v in flat.items():
            if key.endswith("|idx"):
                continue
            name, dim = key.rsplit("|", 1)
            if key + "|idx" not in flat:
                raise DeltaError(f"{path}: slice {key} has no index tensor")
            tensors[(name, int(dim))] = (flat[key + "|idx"], v)
        delta = cls(meta["base_fingerprint"], tensors, json.loads(meta.get("heads", "{}")), meta.get("slices", "qo"))
        if meta.get("delta_hash") and delta.hash() != meta["delta_hash"]:
            raise DeltaError(f"{path} does not match its own checksum (corrupted)")
        return delta
