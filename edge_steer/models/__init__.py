"""Models: the VLA protocol, the reference EdgeVLA, HFVLA (built from transformers modules), the head
locator and the training loop.

Every command that takes `--model` falls back to the embedded default checkpoint, which our own code
trained on the simulated base tasks (see docs/model.md for the command that reproduces it).
"""

from __future__ import annotations

from pathlib import Path

from edge_steer.models.heads import HeadRef, HeadSlices, ParamSlice
from edge_steer.models.interface import VLAPolicy
from edge_steer.models.checkpoint import CheckpointError
from edge_steer.models.vla import EdgeVLA, EdgeVLAConfig

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "edge_vla"


def load_model(path: str | Path | None = None) -> VLAPolicy:
    """Load a checkpoint directory (EdgeVLA or HFVLA, told apart by its saved config), or the embedded
    default when path is None."""
    d = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if path is None and not d.exists():
        raise CheckpointError(f"the default model is missing at {d}; reinstall edge-steer or pass --model")
    from edge_steer.models.checkpoint import read_meta
    return model_class(read_meta(d).get("model_type")).from_pretrained(d)


def model_class(model_type: str | None) -> type:
    """The class a checkpoint's (or an exported engine's) model_type names; EdgeVLA for anything else."""
    from edge_steer.models.flow_matching import FlowMatchingVLA
    from edge_steer.models.modeling_hfvla import HFVLA
    kinds = {cls.model_type: cls for cls in (HFVLA, FlowMatchingVLA)}
    return kinds.get(model_type, EdgeVLA)


__all__ = ["DEFAULT_MODEL_DIR", "CheckpointError", "EdgeVLA", "EdgeVLAConfig", "HeadRef", "HeadSlices",
           "ParamSlice", "VLAPolicy", "load_model", "model_class"]
