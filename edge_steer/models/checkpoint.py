"""A model checkpoint on disk: `config.json` (model type, format, config, fingerprints, the weights' sha256)
and `model.safetensors`. One reader and one writer for every model class, so each refuses a corrupted,
replaced or mismatched checkpoint the same way."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from edge_steer.files import atomic_write_bytes, atomic_write_text, file_sha256

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class CheckpointError(ValueError):
    pass


def read_meta(d: Path) -> dict[str, Any]:
    """A checkpoint directory's config.json, after checking both files are there."""
    if not d.is_dir():
        raise CheckpointError(f"no model directory at {d}")
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / f).is_file():
            raise CheckpointError(f"{d} is not an edge-steer checkpoint: {f} is missing")
    try:
        return json.loads((d / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{d / CONFIG_FILE} is not valid JSON: {e}") from None


def checked_meta(d: Path, model_type: str) -> dict[str, Any]:
    """read_meta, refused unless it holds `model_type` at this format and the weights match their checksum."""
    meta = read_meta(d)
    if meta.get("model_type") != model_type:
        raise CheckpointError(f"{d} holds model_type {meta.get('model_type')!r}, expected {model_type!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{d} has checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    if file_sha256(d / WEIGHTS_FILE) != meta.get("weights_sha256"):
        raise CheckpointError(f"{d / WEIGHTS_FILE} does not match the checksum in {CONFIG_FILE} "
                              "(corrupted or replaced)")
    return meta


def save_checkpoint(model: nn.Module, d: Path, model_type: str, config: dict[str, Any], fingerprint: str,
                    **extra: Any) -> Path:
    """Write the weights, then the config (last: it holds their checksum, so it commits the pair)."""
    from safetensors.torch import save
    weights = save({k: v.contiguous() for k, v in model.state_dict().items()})
    meta = {"model_type": model_type, "format_version": FORMAT_VERSION, "config": config,
            "fingerprint": fingerprint, "weights_sha256": hashlib.sha256(weights).hexdigest(), **extra}
    atomic_write_bytes(d / WEIGHTS_FILE, weights)
    atomic_write_text(d / CONFIG_FILE, json.dumps(meta, indent=1, default=str))
    return d


def load_weights(model: nn.Module, d: Path) -> nn.Module:
    """The checkpoint's weights into `model` (built from its config), refused unless names and shapes fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        state = load_file(str(d / WEIGHTS_FILE))
    except SafetensorError as e:
        raise CheckpointError(f"cannot read {d / WEIGHTS_FILE}: {e}") from None
    expected = model.state_dict()
    missing, extra = set(expected) - set(state), set(state) - set(expected)
    if missing or extra:
        raise CheckpointError(f"weights do not fit the config: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(extra)[:5]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"weight {k} has shape {tuple(v.shape)}, config expects {tuple(expected[k].shape)}")
    model.load_state_dict(state)
    return model.eval()
