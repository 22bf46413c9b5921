"""TensorRT: build a plan from the exported ONNX with our fused-attention plugin, cache it, serve it.

The ONNX file's `com.microsoft::MultiHeadAttention` nodes are retyped to `fused_attention` with
`plugin_namespace=edge_steer` (the same op contract, see edge_steer/engines/fused_attention/contract.py), which
TensorRT's ONNX parser resolves to the plugin registered from `edge_steer/engines/`. The steerable weights stay
network inputs (the ONNX file's initializers for them are turned into inputs, so the parser cannot fold
them into constants): a steering switch is a host-to-device copy of the changed weights, not a rebuild.
TensorRT network inputs have no default values, so a plan never runs alone: `TensorRTEngine` binds the
values its sidecar names (`defaults`: the exported steering, uploaded at load) and refuses a plan
without its sidecar.

A plan only runs on the GPU model and TensorRT version it was built with, so the sidecar records
both and `TrtSession` refuses a mismatch; the build cache is keyed by GPU, compute capability,
TensorRT version, the ONNX file's hash, the precision and the plugin's source hash.

Untested here: no GPU or TensorRT on the machines this was written on (see docs/export.md).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edge_steer.export.graph import FUSED_DOMAIN, FUSED_OP
from edge_steer.export.metadata import EngineError, EngineMeta, base_path, steering_path
from edge_steer.export.onnx_export import steerable_as_inputs
from edge_steer.files import atomic_write_bytes, file_sha256

PLUGIN_PACKAGE = "fused_attention"
PLUGIN_NAME, PLUGIN_NAMESPACE = "fused_attention", "edge_steer"
TRT_PRECISIONS = ("fp32", "fp16", "bf16")
MIN_TRT = (10, 9)            # tensorrt.plugin (quickly deployable plugins) is stable from 10.9


class PluginError(EngineError):
    pass


@dataclass(frozen=True)
class TrtBuildConfig:
    precision: str = "fp16"             # fp32 | fp16 | bf16: what TensorRT may use; I/O stays float32
    workspace_mib: int = 1024
    max_batch: int = 8                  # for a dynamic-batch export: optimisation profile 1..max (opt 1)
    cache_dir: Path | None = None       # default ~/.cache/edge-steer/trt (EDGE_STEER_TRT_CACHE overrides)
    plugin_dir: Path | None = None      # default edge_steer/engines, installed with the package (EDGE_STEER_ENGINES overrides)

    def __post_init__(self):
        if self.precision not in TRT_PRECISIONS:
            raise ValueError(f"TensorRT precision must be one of {TRT_PRECISIONS}, got {self.precision!r}")


# --- environment checks ------------------------------------------------------------------------------
def require_tensorrt() -> ModuleType:
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError("TensorRT is not installed: on an NVIDIA machine `pip install 'edge-steer[trt]'` "
                          "(tensorrt>=10.9) with a CUDA build of torch; elsewhere export --format onnx") from None
    if _version_tuple(trt.__version__) < MIN_TRT:
        raise EngineError(f"TensorRT {trt.__version__} is too old: the fused-attention plugin needs "
                          f">= {'.'.join(map(str, MIN_TRT))} (tensorrt.plugin)")
    return trt


def gpu_identity() -> dict[str, str]:
    """Name and compute capability of the current CUDA device (what a plan is bound to)."""
    import torch
    if not torch.cuda.is_available():
        raise EngineError("no CUDA GPU is visible (or torch is a CPU build): TensorRT plans need an NVIDIA GPU; "
                          "use the onnxruntime engine on this machine")
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def plugin_dir(override: str | Path | None = None) -> Path:
    """Where the plugin's sources are: `edge_steer/engines/` of the installed package (it ships in the
    wheel), unless a folder is given or EDGE_STEER_ENGINES names one (a plugin under development)."""
    if override is not None:
        return Path(override)
    if os.environ.get("EDGE_STEER_ENGINES"):
        return Path(os.environ["EDGE_STEER_ENGINES"])
    return Path(str(importlib.resources.files("edge_steer.engines")))


def load_plugin(directory: str | Path | None = None) -> ModuleType:
    """Import the fused-attention plugin package and register the plugin with TensorRT: the installed
    `edge_steer.engines.fused_attention`, or the one in an overriding folder (imported by path). A
    missing or broken plugin is a PluginError that says where it looked."""
    pkg = plugin_dir(directory) / PLUGIN_PACKAGE
    init = pkg / "__init__.py"
    if not init.is_file():
        raise PluginError(f"the fused-attention plugin is missing: {init} not found (a broken install, or "
                          "EDGE_STEER_ENGINES names the wrong folder)")
    default = directory is None and not os.environ.get("EDGE_STEER_ENGINES")
    name = "edge_steer.engines.fused_attention" if default else "edge_steer_engines_fused_attention"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(pkg)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise PluginError(f"cannot import the fused-attention plugin from {pkg}: {e}") from e
    try:
        plugin = importlib.import_module(f"{name}.plugin")
        plugin.register()
    except ImportError as e:
        raise PluginError(f"the fused-attention plugin in {pkg} cannot load ({e}): it needs tensorrt>=10.9, "
                          "triton and a CUDA build of torch") from e
    return sys.modules[name]


def plugin_hash(directory: str | Path | None = None) -> str:
    """sha256 over the plugin's Python sources: a changed kernel invalidates cached plans."""
    pkg = plugin_dir(directory) / PLUGIN_PACKAGE
    if not pkg.is_dir():
        raise PluginError(f"the fused-attention plugin is missing: no folder {pkg}")
    h = hashlib.sha256()
    for f in sorted(pkg.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def cache_key(onnx_sha256: str, precision: str, gpu: dict[str, str], trt_version: str, plugin_sha256: str,
              max_batch: int | None = None) -> str:
    """The plan cache key: everything a plan depends on (a plan is not portable across any of them)."""
    parts = [onnx_sha256, precision, gpu["name"], gpu["compute_capability"], trt_version, plugin_sha256,
             str(max_batch)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("EDGE_STEER_TRT_CACHE", Path.home() / ".cache" / "edge-steer" / "trt"))


# --- ONNX -> TensorRT network ------------------------------------------------------------------------
def rewrite_for_tensorrt(proto, steerable_inputs: list[str]):
    """Retype every fused MultiHeadAttention node to the plugin op and make the steerable weights
    plain inputs. Returns a new ModelProto; raises if the graph has attention the plugin cannot take."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    n_fused = 0
    for node in g.node:
        if node.op_type == FUSED_OP and node.domain == FUSED_DOMAIN:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            unsupported = set(attrs) - {"num_heads", "scale"}
            if unsupported or len(node.input) != 5 or node.input[3] or not node.input[4]:
                what = sorted(unsupported) or "inputs other than q, k, v and a key-padding mask (a bias, or an " \
                                              "attention_bias: a causal or 4-D mask)"
                raise EngineError(f"attention node {node.name} uses {what}, which the fused-attention plugin "
                                  "does not implement")
            q, k, v, _, mask = node.input
            del node.input[:]
            node.input.extend([q, k, v, mask])
            del node.attribute[:]
            node.attribute.extend([onnx.helper.make_attribute("num_heads", int(attrs["num_heads"])),
                                   onnx.helper.make_attribute("scale", float(attrs["scale"])),
                                   onnx.helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE)])
            node.op_type, node.domain = PLUGIN_NAME, ""
            n_fused += 1
    if n_fused == 0:
        raise EngineError("the ONNX graph has no fused attention node: export it with edge-steer export first")
    return steerable_as_inputs(out, steerable_inputs)


def build_engine(onnx_path: str | Path, out: str | Path, config: TrtBuildConfig = TrtBuildConfig()) -> EngineMeta:
    """ONNX engine (with its sidecar) -> TensorRT plan `out` (.plan) with its own sidecar, via the cache."""
    import onnx

    onnx_path, out = Path(onnx_path), Path(out)
    meta = EngineMeta.load(onnx_path)
    meta.check_files(onnx_path)
    trt = require_tensorrt()
    gpu = gpu_identity()
    load_plugin(config.plugin_dir)
    key = cache_key(meta.engine_sha256, config.precision, gpu, trt.__version__, plugin_hash(config.plugin_dir),
                    config.max_batch if meta.dynamic_batch else None)
    cache = (config.cache_dir or default_cache_dir()) / f"{key}.plan"
    if not cache.is_file():
        proto = rewrite_for_tensorrt(onnx.load(str(onnx_path)), [s.input for s in meta.steerable])
        plan = _build_plan(trt, proto, meta, config)
        atomic_write_bytes(cache, plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cache, out)
    shutil.copyfile(base_path(onnx_path), base_path(out))
    if meta.steering_file:
        shutil.copyfile(onnx_path.with_name(meta.steering_file), steering_path(out))
    trt_meta = replace(meta, backend="tensorrt", engine_file=out.name, engine_sha256=file_sha256(out),
                       base_file=base_path(out).name, precision=config.precision,
                       steering_file=steering_path(out).name if meta.steering_file else None,
                       session_options={}, tensorrt={"gpu": gpu["name"], "compute_capability": gpu["compute_capability"],
                                                     "version": trt.__version__, "cache_key": key,
                                                     "plugin": f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}",
                                                     "plugin_sha256": plugin_hash(config.plugin_dir),
                                                     "onnx_sha256": meta.engine_sha256,
                                                     "max_batch": config.max_batch if meta.dynamic_batch else 1},
                       versions={**meta.versions, "tensorrt": trt.__version__})
    trt_meta.save(out)
    return trt_meta


def _build_plan(trt, proto, meta: EngineMeta, config: TrtBuildConfig) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)          # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(proto.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse the exported graph: {errors}")
    bc = builder.create_builder_config()
    bc.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mib << 20)
    if config.precision == "fp16":
        bc.set_flag(trt.BuilderFlag.FP16)
    elif config.precision == "bf16":
        bc.set_flag(trt.BuilderFlag.BF16)
    if meta.dynamic_batch:
        profile = builder.create_optimization_profile()
        for spec in meta.inputs:
            if spec.shape and spec.shape[0] == "batch":
                rest = tuple(int(d) for d in spec.shape[1:])
                profile.set_shape(spec.name, (1, *rest), (1, *rest), (config.max_batch, *rest))
        bc.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, bc)
    if plan is None:
        raise EngineError("TensorRT failed to build the engine (see the log above)")
    return bytes(plan)


# --- serving ----------------------------------------------------------------------------------------
def check_plan_target(meta: EngineMeta, gpu: dict[str, str], trt_version: str) -> None:
    """Refuse a plan built for another GPU or TensorRT version, with what to do about it."""
    t = meta.tensorrt or {}
    if not t:
        raise EngineError(f"{meta.engine_file}'s sidecar has no TensorRT section: not a TensorRT plan")
    if t.get("version") != trt_version:
        raise EngineError(f"{meta.engine_file} was built with TensorRT {t.get('version')}, this machine has "
                          f"{trt_version}: rebuild it here with `edge-steer export --format trt`")
    if (t.get("gpu"), t.get("compute_capability")) != (gpu["name"], gpu["compute_capability"]):
        raise EngineError(f"{meta.engine_file} was built for {t.get('gpu')} (sm {t.get('compute_capability')}), this "
                          f"machine has {gpu['name']} (sm {gpu['compute_capability']}): rebuild it here")


class TrtSession:
    """A deserialized plan with device buffers (torch CUDA tensors) for every input and the output."""

    def __init__(self, path: str | Path, meta: EngineMeta, plugin_directory: str | Path | None = None):
        import torch

        trt = require_tensorrt()
        check_plan_target(meta, gpu_identity(), trt.__version__)
        load_plugin(plugin_directory)        # the plan's plugin layers call back into it
        self._torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize {path}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.meta = meta
        self.output = meta.outputs[0].name
        self.device: dict[str, Any] = {}
        for s in meta.steerable:
            self.device[s.input] = torch.empty(tuple(s.shape), dtype=torch.float32, device="cuda")

    def upload(self, arrays: dict[str, np.ndarray]) -> None:
        """Copy changed steerable weights to the GPU (a steering switch)."""
        with self._torch.cuda.stream(self.stream):
            for name, a in arrays.items():
                self.device[name].copy_(self._torch.from_numpy(a), non_blocking=False)
        self.stream.synchronize()

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        b = next(iter(feeds.values())).shape[0]
        out = torch.empty((b, *self.meta.outputs[0].shape[1:]), dtype=torch.float32, device="cuda")
        with torch.cuda.stream(self.stream):
            inputs = {k: torch.from_numpy(v).to("cuda", non_blocking=True) for k, v in feeds.items()}
            for name, t in {**inputs, **self.device}.items():
                if self.meta.dynamic_batch and name in feeds:
                    self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
            self.context.set_tensor_address(self.output, out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise EngineError("TensorRT execution failed (see the log above)")
        self.stream.synchronize()
        return out.cpu().numpy()


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:2] if x.isdigit())
