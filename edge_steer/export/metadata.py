"""The metadata sidecar that travels with every exported engine, and the files beside it.

An engine `policy.onnx` (or `policy.plan`) comes with:

    policy.onnx.json                 this sidecar: what the runtime checks before it loads anything
    policy.onnx.base.safetensors     base values of the steerable weights (what `set_steering(None)` restores)
    policy.onnx.steering.safetensors the steering delta exported (only with --steering); the .onnx's own
                                     steerable values already hold it (`defaults: "steering"`)
    policy.onnx.tokenizer/           files the model's host preprocessing needs (an HFVLA's tokenizer),
                                     listed with checksums under `assets`

The sidecar names the base model (fingerprint), the steering (delta hash), the graph's inputs and
outputs with shapes, the preprocessing and action normalisation (so a backend needs no checkpoint),
the opset, the precision, the session options and, for TensorRT, the GPU and TensorRT version the
plan was built for.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edge_steer.files import atomic_write_text, file_sha256

SIDECAR_FORMAT = "edge-steer-engine/2"     # 2: steerable weights are initializers holding `defaults`


class EngineError(RuntimeError):
    """An engine or its sidecar is missing, corrupted, or does not fit this machine."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: list[int | str]          # str: a dynamic axis (e.g. "batch")
    dtype: str                      # numpy dtype name

    def check(self, array, what: str = "input") -> None:
        """Raise a clear ValueError when `array` does not fit this spec."""
        shape = tuple(array.shape)
        if len(shape) != len(self.shape) or any(isinstance(e, int) and e != a for e, a in zip(self.shape, shape)):
            raise ValueError(f"{what} {self.name!r} has shape {shape}, the engine expects "
                             f"{tuple(self.shape)} (dynamic axes by name)")
        if str(array.dtype) != self.dtype:
            raise ValueError(f"{what} {self.name!r} has dtype {array.dtype}, the engine expects {self.dtype}")


@dataclass(frozen=True)
class SteerableSpec:
    param: str                      # model parameter, e.g. blocks.0.attn.q_proj.weight
    input: str                      # its ONNX initializer (the file's value); an input of an engine's session / plan
    shape: list[int]


@dataclass
class EngineMeta:
    backend: str                                  # "onnxruntime" | "tensorrt"
    engine_file: str                              # file name, beside the sidecar
    engine_sha256: str
    base_fingerprint: str
    model_config: dict[str, Any]                  # the model's config as a dict: cameras, image size, ...
    normalisation: dict[str, list[float]]         # state_mean, state_std, action_mean, action_std
    inputs: list[TensorSpec]                      # the graph's declared inputs (onnxruntime's get_inputs())
    outputs: list[TensorSpec]
    steerable: list[SteerableSpec]
    base_file: str                                # base values of the steerable weights
    base_sha256: str
    precision: str = "fp32"
    opset: int = 17
    dynamic_batch: bool = False
    fused_attention: dict[str, Any] = field(default_factory=dict)   # op, domain, nodes
    steering_hash: str | None = None
    steering_file: str | None = None
    defaults: str = "base"                        # what the file's steerable values hold: "base" | "steering" (steering_hash)
    language_fingerprint: str | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)   # the model's `export_preprocessing()` record
    model_type: str = "edge_vla"                  # whose `host_preprocessor` rebuilds the host side
    assets: dict[str, str] = field(default_factory=dict)          # file beside the engine -> sha256
    session_options: dict[str, Any] = field(default_factory=dict)
    tensorrt: dict[str, Any] | None = None        # gpu, compute capability, version, cache key, plugin
    versions: dict[str, str] = field(default_factory=dict)
    format: str = SIDECAR_FORMAT

    # --- files --------------------------------------------------------------------------------------
    def save(self, engine_path: str | Path) -> Path:
        p = sidecar_path(engine_path)
        atomic_write_text(p, json.dumps(asdict(self), indent=1))
        return p

    @classmethod
    def load(cls, engine_path: str | Path) -> "EngineMeta":
        engine_path = Path(engine_path)
        p = sidecar_path(engine_path)
        if not engine_path.is_file():
            raise EngineError(f"no engine at {engine_path}")
        if not p.is_file():
            raise EngineError(f"{engine_path} has no metadata sidecar {p.name}: re-export it with `edge-steer export`")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise EngineError(f"{p} is not valid JSON: {e}") from None
        if d.get("format") != SIDECAR_FORMAT:
            raise EngineError(f"{p} has format {d.get('format')!r}, this edge-steer reads {SIDECAR_FORMAT!r}: "
                              "re-export the engine with `edge-steer export`")
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise EngineError(f"{p} has unknown fields {sorted(set(d) - known)} (written by a newer edge-steer?)")
        try:
            d["inputs"] = [TensorSpec(**x) for x in d["inputs"]]
            d["outputs"] = [TensorSpec(**x) for x in d["outputs"]]
            d["steerable"] = [SteerableSpec(**x) for x in d["steerable"]]
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise EngineError(f"{p} is incomplete: {e}") from None

    def check_files(self, engine_path: str | Path) -> None:
        """The engine and the base-weights file are the ones this sidecar was written for."""
        engine_path = Path(engine_path)
        if engine_path.name != self.engine_file:
            raise EngineError(f"sidecar of {engine_path} describes {self.engine_file!r}: renamed or mixed up")
        if file_sha256(engine_path) != self.engine_sha256:
            raise EngineError(f"{engine_path} does not match the checksum in its sidecar (corrupted or replaced)")
        base = engine_path.with_name(self.base_file)
        if not base.is_file():
            raise EngineError(f"{engine_path} lacks its steerable base weights {base.name}")
        if file_sha256(base) != self.base_sha256:
            raise EngineError(f"{base} does not match the checksum in the sidecar (corrupted or replaced)")
        if self.steering_file and not engine_path.with_name(self.steering_file).is_file():
            raise EngineError(f"{engine_path} was exported with steering {self.steering_file}, which is missing")
        for name, sha in self.assets.items():
            f = engine_path.parent / name
            if not f.is_file():
                raise EngineError(f"{engine_path} lacks {name}, which its preprocessing needs: copy it along or re-export")
            if file_sha256(f) != sha:
                raise EngineError(f"{f} does not match the checksum in the sidecar (corrupted or replaced)")

    def input_spec(self, name: str) -> TensorSpec:
        return next(s for s in self.inputs if s.name == name)


def sidecar_path(engine_path: str | Path) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def base_path(engine_path: str | Path) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + ".base.safetensors")


def steering_path(engine_path: str | Path) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + ".steering.safetensors")


