"""The `Engine` protocol: what the daemon and the sim evaluator call to turn an observation into actions.

An engine owns the model's preprocessing and action de-normalisation, so every backend (torch,
onnxruntime, TensorRT) answers the same `predict(observation, instruction)` with the same
(chunk, action_dim) array in robot units: all three run the model's own preprocessing (`prepare`; an
exported engine rebuilds it from the sidecar with the model class's `host_preprocessor`) before
their graph and `action_chunk` after it. Steering deltas switch at run time through `set_steering`,
without reloading or re-exporting the engine. `load_engine` picks the backend from the path: a
checkpoint directory (torch, or cuda-graph on request), `.onnx` (onnxruntime), `.plan`/`.engine` (TensorRT); exported engines
carry a metadata sidecar (`edge_steer.export.metadata`) that is checked before anything is loaded.
Backend libraries are imported lazily.
"""

from __future__ import annotations

import time
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


class _ExportedEngine:
    """What the onnxruntime and TensorRT backends share: the sidecar checks, the host-side pre- and
    post-processing (the model's own functions, with statistics from the sidecar) and the steerable
    weights. A subclass provides `_run(feeds) -> normalised chunk batch` and `_steering_changed`."""

    backend = ""

    def __init__(self, path: str | Path, steering: Any = "exported"):
        from edge_steer.export.metadata import EngineError, EngineMeta, base_path
        from edge_steer.export.steerable import SteerableWeights
        from edge_steer.models import model_class

        self.path = Path(path)
        t0 = time.perf_counter()
        self.meta = meta = EngineMeta.load(self.path)
        if meta.backend != self.backend:
            raise EngineError(f"{self.path} is a {meta.backend} engine, not {self.backend}")
        meta.check_files(self.path)
        # the host side as the exported model described it (its class rebuilds it from the sidecar)
        preprocessing = {**meta.preprocessing, "language_fingerprint": meta.language_fingerprint}
        try:
            self.host = model_class(meta.model_type).host_preprocessor(meta.model_config, preprocessing,
                                                                       meta.normalisation, self.path)
        except (KeyError, OSError, ValueError) as e:
            raise EngineError(f"{self.path}: cannot rebuild its preprocessing: {e}") from None
        self.config = self.host.config
        norm = {k: np.asarray(v, dtype=np.float32) for k, v in meta.normalisation.items()}
        self._action_mean, self._action_std = norm["action_mean"], norm["action_std"]
        self._specs = {s.name: s for s in meta.inputs}
        self.steer = SteerableWeights.from_file(meta.steerable, base_path(self.path), meta.base_fingerprint,
                                                meta.fused_attention.get("steerable_projections", ""))
        self._open()
        if steering == "exported":
            steering = self.path.with_name(meta.steering_file) if meta.steering_file else None
        self.set_steering(steering)
        self.load_seconds = time.perf_counter() - t0

    # --- subclass hooks -------------------------------------------------------------------------------
    def _open(self) -> None:
        raise NotImplementedError

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def _steering_changed(self, params: list[str]) -> None:
        """The host arrays of `params` changed (a backend with device copies uploads them)."""

    # --- the Engine protocol -------------------------------------------------------------------------
    def inputs(self, observation: Mapping[str, Any], instruction: str) -> dict[str, np.ndarray]:
        """One observation -> the graph's normalised inputs (the model's own preprocessing)."""
        from edge_steer.models.vla import observation_batch
        t = self.host.prepare(observation_batch(observation, instruction))
        return {k: v.numpy() for k, v in t.items()}

    def run(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Normalised inputs (images, state, lang, lang_mask) -> normalised chunks (B, chunk, action_dim)."""
        missing = set(self._specs) - set(inputs)
        if missing:
            raise ValueError(f"engine inputs lack {sorted(missing)}")
        batch = {np.shape(inputs[k])[0] for k in self._specs}
        if len(batch) != 1:
            raise ValueError(f"engine inputs disagree on the batch size: {sorted(batch)}")
        feeds = {}
        for name, spec in self._specs.items():
            a = np.ascontiguousarray(inputs[name])
            spec.check(a)
            feeds[name] = a
        return self._run(feeds)

    def predict(self, observation: Mapping[str, Any], instruction: str) -> np.ndarray:
        from edge_steer.models.vla import action_chunk
        return action_chunk(self.run(self.inputs(observation, instruction))[0], self._action_mean, self._action_std)

    def set_steering(self, delta) -> None:
        self._steering_changed(self.steer.set(delta))

    def metadata(self) -> dict[str, Any]:
        from dataclasses import asdict
        c = self.config
        return {"backend": self.backend, "engine": str(self.path), "base_fingerprint": self.meta.base_fingerprint,
                "steering_hash": self.steer.steering_hash, "exported_steering_hash": self.meta.steering_hash,
                "cameras": list(c.cameras), "image_size": c.image_size, "state_dim": c.state_dim, "chunk": c.chunk,
                "action_dim": c.action_dim, "precision": self.meta.precision,
                "inputs": [asdict(s) for s in self.meta.inputs], "defaults": self.meta.defaults,
                "outputs": [asdict(s) for s in self.meta.outputs], "steerable_inputs": len(self.meta.steerable),
                "preprocessing": self.meta.preprocessing, "load_seconds": getattr(self, "load_seconds", None)}


class OnnxEngine(_ExportedEngine):
    """onnxruntime backend (CPU by default; CUDA where onnxruntime-gpu is installed)."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, steering: Any = "exported", providers: list[str] | None = None,
                 intra_op_threads: int | None = None):
        self._providers, self._threads = providers, intra_op_threads
        super().__init__(path, steering)

    def _open(self) -> None:
        import onnx
        import onnxruntime as ort

        from edge_steer.export.onnx_export import steerable_as_inputs
        opts = dict(self.meta.session_options)
        if self._threads is not None:
            opts["intra_op_num_threads"] = self._threads
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                              opts.get("graph_optimization_level", "ORT_ENABLE_ALL"))
        so.intra_op_num_threads = int(opts.get("intra_op_num_threads", 0))
        so.inter_op_num_threads = int(opts.get("inter_op_num_threads", 1))
        so.execution_mode = getattr(ort.ExecutionMode, opts.get("execution_mode", "ORT_SEQUENTIAL"))
        # idle intra-op threads spin by default, taking the cores from the daemon's other threads
        # (camera, control, and torch in a side-by-side benchmark) between frames
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if opts.get("allow_spinning") else "0")
        self.session_options = opts
        # the file's steerable initializers become plain inputs of this session, fed from host arrays:
        # a steering switch writes those arrays, no initializer is overridden (nothing to warn about)
        proto = steerable_as_inputs(onnx.load(str(self.path)), [s.input for s in self.meta.steerable])
        self.session = ort.InferenceSession(proto.SerializeToString(), so,
                                            providers=self._providers or ["CPUExecutionProvider"])
        self._output = self.meta.outputs[0].name

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        # the steerable arrays are fed every call: onnxruntime wraps CPU numpy buffers without copying
        return self.session.run([self._output], {**feeds, **self.steer.feeds()})[0]


class TensorRTEngine(_ExportedEngine):
    """TensorRT backend: a serialized plan whose attention nodes run our fused-attention plugin
    (`edge_steer/engines/`). Needs an NVIDIA GPU, the `tensorrt` package and a CUDA build of torch."""

    backend = "tensorrt"

    def _open(self) -> None:
        from edge_steer.export.tensorrt import TrtSession
        self.session = TrtSession(self.path, self.meta)
        self.session.upload(self.steer.feeds())        # device copies start as the base weights

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(feeds)

    def _steering_changed(self, params: list[str]) -> None:
        self.session.upload({self.steer.specs[p].input: self.steer.live[p] for p in params})


class CudaGraphEngine:
    """A GPU engine that needs no TensorRT: the model in PyTorch on CUDA with every attention core
    running our Triton kernel (`edge_steer.engines.fused_attention`, the op the exports fuse to) and the
    whole forward captured once in a CUDA graph, replayed per frame. It runs the export's own graph
    (`edge_steer.export.graph.ExportGraph`): images, state, language and the steerable weights are
    static device buffers the graph reads, so a steering switch copies the changed weights into those
    buffers (the same host arrays and delta logic as the onnxruntime and TensorRT engines).

    `device="cpu", capture=False` runs the same buffers and switching eagerly with the reference
    attention: a check of everything but the kernel and the capture, for machines without a GPU."""

    backend = "cuda-graph"

    def __init__(self, model, steering=None, device: str = "cuda", capture: bool = True,
                 projections: str = "qkvo", precision: str = "ieee"):
        import copy

        import torch

        from edge_steer.export.graph import ExportGraph, reference_core, steerable_params
        from edge_steer.export.metadata import EngineError, SteerableSpec
        from edge_steer.export.onnx_export import model_inputs
        from edge_steer.export.steerable import SteerableWeights

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError("the cuda-graph engine needs an NVIDIA GPU and a CUDA build of torch (this torch "
                              f"{torch.__version__} sees no GPU): use the torch or onnxruntime backend here")
        if capture and not device.startswith("cuda"):
            raise EngineError("a CUDA graph is captured on a CUDA device only")
        t0 = time.perf_counter()
        self._torch = torch
        self.device, self.capture = device, capture
        self.model = copy.deepcopy(model).eval().to(device)
        self.config = model.config
        self._base_fingerprint = model.fingerprint()
        self._action_mean, self._action_std = model.action_mean.numpy(), model.action_std.numpy()
        # host-side preprocessing: the CPU model's own (its statistics, instruction encoder, image scaling)
        self._prepare = model.prepare
        names = steerable_params(self.model, projections)      # every q/k/v/o: any steer delta fits
        params = dict(self.model.named_parameters())
        self.steer = SteerableWeights([SteerableSpec(n, n, list(params[n].shape)) for n in names],
                                      {n: params[n].detach().float().cpu().numpy() for n in names},
                                      self._base_fingerprint, projections)
        core = reference_core if not device.startswith("cuda") else _triton_core(precision)
        self._graph_module = ExportGraph(self.model, names, core)
        self._inputs = {k: v.to(device) for k, v in model_inputs(model).items()}
        self._weights = {n: params[n].detach().clone() for n in names}
        self._graph = None
        with torch.no_grad():
            if capture:
                self._capture()
            else:
                self._out = self._forward()
        self.set_steering(steering)
        self.load_seconds = time.perf_counter() - t0

    @classmethod
    def load(cls, path: str | Path | None = None, steering=None, **options) -> "CudaGraphEngine":
        from edge_steer.models import load_model
        return cls(load_model(path), steering, **options)

    def _forward(self):
        return self._graph_module(*self._inputs.values(), *self._weights.values())

    def _capture(self) -> None:
        torch = self._torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):              # warm-up compiles the Triton kernel outside the capture
            for _ in range(3):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._out = self._forward()
        torch.cuda.synchronize()

    def run(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Normalised inputs (batch 1) -> normalised chunk (1, chunk, action_dim): copy into the static
        input buffers, replay the graph (or run it, without capture), read the static output."""
        torch = self._torch
        for name, buf in self._inputs.items():
            if name not in inputs:
                raise ValueError(f"engine inputs lack {name!r}")
            a = torch.as_tensor(np.asarray(inputs[name]))
            if tuple(a.shape) != tuple(buf.shape) or a.dtype != buf.dtype:
                raise ValueError(f"input {name!r} is {tuple(a.shape)} {a.dtype}, the graph was captured for "
                                 f"{tuple(buf.shape)} {buf.dtype}")
            buf.copy_(a, non_blocking=True)
        with torch.no_grad():
            if self._graph is not None:
                self._graph.replay()
            else:
                self._out = self._forward()
        return self._out.cpu().numpy()

    def inputs(self, observation: Mapping[str, Any], instruction: str) -> dict[str, np.ndarray]:
        from edge_steer.models.vla import observation_batch
        with self._torch.no_grad():
            t = self._prepare(observation_batch(observation, instruction))
        return {k: v.numpy() for k, v in t.items()}

    def predict(self, observation: Mapping[str, Any], instruction: str) -> np.ndarray:
        from edge_steer.models.vla import action_chunk
        return action_chunk(self.run(self.inputs(observation, instruction))[0], self._action_mean, self._action_std)

    def set_steering(self, delta) -> None:
        changed = self.steer.set(delta)
        for p in changed:                          # only what the old and new deltas touch
            self._weights[p].copy_(self._torch.from_numpy(self.steer.live[p]))

    def metadata(self) -> dict[str, Any]:
        c = self.config
        return {"backend": self.backend, "device": self.device, "cuda_graph": self._graph is not None,
                "base_fingerprint": self._base_fingerprint, "steering_hash": self.steer.steering_hash,
                "cameras": list(c.cameras), "image_size": c.image_size, "state_dim": c.state_dim, "chunk": c.chunk,
                "action_dim": c.action_dim, "load_seconds": getattr(self, "load_seconds", None)}


def _triton_core(precision: str):
    """The attention core on CUDA: our Triton kernel, writing into a fresh output (captured with the graph)."""
    import torch

    from edge_steer.engines.fused_attention.kernel import launch

    def triton_core(q, k, v, key_mask, num_heads: int, scale: float):
        q, k, v, key_mask = (t.contiguous() for t in (q, k, v, key_mask))
        out = torch.empty_like(q)
        launch(q, k, v, key_mask, out, num_heads, scale, precision=precision)
        return out

    return triton_core


ENGINE_SUFFIXES = {".onnx": "onnxruntime", ".plan": "tensorrt", ".engine": "tensorrt", ".trt": "tensorrt"}
BACKENDS = {"torch": TorchEngine, "onnxruntime": OnnxEngine, "tensorrt": TensorRTEngine, "cuda-graph": CudaGraphEngine}


def load_engine(path: str | Path | None = None, backend: str | None = None, steering: Any = "exported",
                **options) -> Engine:
    """Open an engine, choosing the backend from the path: a checkpoint directory or None (the default
    model) -> torch; `.onnx` -> onnxruntime; `.plan` / `.engine` / `.trt` -> TensorRT; a sidecar
    `.json` -> the engine it describes. `backend` forces one and must agree with the file;
    `backend="cuda-graph"` serves a checkpoint on CUDA through a captured graph (`CudaGraphEngine`).
    steering: a delta or its path, None for the base model, or "exported" for the delta (if any)
    baked in at export."""
    from edge_steer.export.metadata import EngineError

    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {sorted(BACKENDS)}")
    p = Path(path) if path is not None else None
    if p is not None and p.suffix == ".json" and p.name.endswith(tuple(f"{s}.json" for s in ENGINE_SUFFIXES)):
        p = p.with_name(p.name[: -len(".json")])
    if p is None or p.is_dir():
        found = "torch"
    elif p.suffix in ENGINE_SUFFIXES:
        found = ENGINE_SUFFIXES[p.suffix]
    elif not p.exists():
        raise EngineError(f"no engine or checkpoint at {p}")
    else:
        raise EngineError(f"cannot tell the backend of {p}: expected a checkpoint directory or one of "
                          f"{sorted(ENGINE_SUFFIXES)}")
    if backend == "cuda-graph" and found == "torch":     # a checkpoint served on CUDA through a captured graph
        return CudaGraphEngine.load(p, steering=None if steering == "exported" else steering, **options)
    if backend is not None and backend != found:
        raise EngineError(f"{p} is a {found} engine; it cannot be served by the {backend} backend")
    if found == "torch":
        return TorchEngine.load(p, steering=None if steering == "exported" else steering)
    return BACKENDS[found](p, steering=steering, **options)
