"""Export a (steered) model of the VLA protocol (EdgeVLA, HFVLA; through `trace_onnx`, any model whose
heads the locator finds) to ONNX for onnxruntime, with one fused attention node per layer (a
transformers vision tower's layers included).

What the engine runs on the host around the graph is described by the model itself
(`export_preprocessing`, recorded in the sidecar with the files it needs, e.g. an HFVLA's tokenizer
copied beside the .onnx); the engine rebuilds it with the model class's `host_preprocessor`.

How the fusion is done: `graph.fused_attention` swaps each attention layer's forward, for the trace
only, for one whose core is an autograd Function with an ONNX `symbolic` that emits
`com.microsoft::MultiHeadAttention` (torch.onnx's TorchScript exporter, which needs no extra
package). `check_fused` then counts the nodes: exactly one per layer, and no attention Softmax left
(the one Softmax a keypoint stem has is over its feature maps, not attention).

Steering: the q/o weights (or those named by `steerable`) of every layer are ONNX initializers named
`steer.<parameter>` holding the exported model's values: the base weights, or the steered ones when a
delta is given, so the file alone computes what was exported (the sidecar's `defaults` says which).
They are not declared graph inputs (a plain onnxruntime session sees the data inputs only and loads
quietly); an engine that switches deltas at run time makes them inputs of its own session
(`steerable_as_inputs`) and feeds them from host arrays. The delta is stored beside the engine and the
base values too, so an engine can switch to other deltas and back to the base.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from edge_steer.export.graph import (FUSED_DOMAIN, FUSED_OP, PROJECTIONS, ExportGraph, input_name, n_attention_layers,
                                     steerable_params)
from edge_steer.export.metadata import EngineMeta, SteerableSpec, TensorSpec, base_path, steering_path
from edge_steer.export.steerable import SteerableWeights
from edge_steer.files import atomic_path, atomic_write_bytes, file_sha256
from edge_steer.steering.delta import SteeringDelta

INPUTS = ("images", "state", "lang", "lang_mask")
OUTPUT = "actions"
PRECISIONS = ("fp32", "fp16")


class ExportError(RuntimeError):
    pass


@dataclass(frozen=True)
class OnnxExportConfig:
    opset: int = 17                 # MultiHeadAttention lives in com.microsoft opset 1 beside it
    dynamic_batch: bool = False     # False: static batch 1, the robot's case (fixed shapes plan best)
    steerable: str = "qo"           # projections that are graph inputs (switchable per delta)
    precision: str = "fp32"         # "fp16": weights and compute in half, inputs/outputs stay float32
    intra_op_threads: int = 2       # recorded as the session options the engine uses
    graph_optimization: str = "ORT_ENABLE_ALL"
    allow_spinning: bool = False    # idle ORT threads busy-wait by default: off, the robot's other threads need the cores

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS} for onnxruntime, got {self.precision!r}")
        if set(self.steerable) - set(PROJECTIONS):
            raise ValueError(f"steerable {self.steerable!r} has letters other than q, k, v, o")


def example_inputs(config, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random forward() inputs of the right shapes and dtypes (what export traces with)."""
    g = torch.Generator().manual_seed(seed)
    c = config
    n, L = len(c.cameras), c.max_lang_tokens
    lang = (torch.randn(batch, L, 384, generator=g) if c.language == "minilm"
            else torch.randint(0, c.lang_buckets, (batch, L), generator=g))
    mask = torch.zeros(batch, L, dtype=torch.bool)
    mask[:, : max(1, L // 2)] = True
    return {"images": torch.randn(batch, n, 3, c.image_size, c.image_size, generator=g),
            "state": torch.randn(batch, c.state_dim, generator=g), "lang": lang, "lang_mask": mask}


def model_inputs(model, batch: int = 1) -> dict[str, torch.Tensor]:
    """What the model's forward takes (name -> example tensor): its own `example_inputs()` where it has
    one (HFVLA), else EdgeVLA's, from its config."""
    return model.example_inputs(batch) if hasattr(model, "example_inputs") else example_inputs(model.config, batch)


def export_onnx(model, out: str | Path, steering: SteeringDelta | str | Path | None = None,
                config: OnnxExportConfig = OnnxExportConfig()) -> EngineMeta:
    """Write `out` (.onnx), its sidecar and the steerable base weights; returns the sidecar.
    The file's steerable weights hold the steered values when `steering` is given: run alone (a plain
    onnxruntime session) it computes the steered model."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    fingerprint = model.fingerprint()
    delta = None
    projections = config.steerable
    if steering is not None:
        delta = steering if isinstance(steering, SteeringDelta) else SteeringDelta.load(steering)
        delta.check_base(fingerprint)
        # a delta that touches k or v makes those switchable too, rather than being refused later
        touched = {name for name, _ in delta.tensors}
        projections += "".join(p for p in PROJECTIONS if p not in projections
                               and touched & set(steerable_params(model, p)))
    names = steerable_params(model, projections)
    params = dict(model.named_parameters())
    base = {n: params[n].detach().float().contiguous() for n in names}
    specs = [SteerableSpec(n, input_name(n), list(base[n].shape)) for n in names]
    defaults = SteerableWeights(specs, {n: t.numpy() for n, t in base.items()}, fingerprint, projections)
    defaults.set(delta)                          # the file's own values: base, or base + the delta
    inputs = model_inputs(model)
    proto = trace_onnx(model, inputs, OUTPUT, {n: torch.from_numpy(defaults.live[n]) for n in names}, config)
    # one fused node per attention module the head locator finds; a keypoint stem's Softmax is not attention
    counts = check_fused(proto, n_attention_layers(model), other_softmax=int(getattr(model.config, "keypoints", 0) > 0))
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    preprocessing = dict(model.export_preprocessing(out))     # writes the files it needs beside `out`
    assets = {f: file_sha256(out.parent / f) for f in preprocessing.pop("files", [])}

    from safetensors.numpy import save
    atomic_write_bytes(base_path(out), save({n: t.numpy() for n, t in base.items()}))
    steering_file = None
    if delta is not None:
        delta.save(steering_path(out))
        steering_file = steering_path(out).name
    elif steering_path(out).exists():
        steering_path(out).unlink()             # a stale delta from an earlier export to the same path

    meta = EngineMeta(
        backend="onnxruntime", engine_file=out.name, engine_sha256=file_sha256(out),
        base_fingerprint=fingerprint, model_config=asdict(model.config),
        normalisation={k: getattr(model, k).tolist() for k in ("state_mean", "state_std", "action_mean", "action_std")},
        inputs=_specs(inputs, config.dynamic_batch),
        outputs=[TensorSpec(OUTPUT, ["batch" if config.dynamic_batch else 1, model.config.chunk,
                                     model.config.action_dim], "float32")],
        steerable=specs, base_file=base_path(out).name, base_sha256=file_sha256(base_path(out)),
        precision=config.precision, opset=config.opset, dynamic_batch=config.dynamic_batch,
        fused_attention={"op": FUSED_OP, "domain": FUSED_DOMAIN, "nodes": counts[FUSED_OP],
                         "steerable_projections": projections},
        steering_hash=delta.hash() if delta is not None else None, steering_file=steering_file,
        defaults="steering" if delta is not None else "base",
        language_fingerprint=preprocessing.pop("language_fingerprint", None),
        preprocessing=preprocessing, model_type=model.model_type, assets=assets,
        session_options={"graph_optimization_level": config.graph_optimization,
                         "intra_op_num_threads": config.intra_op_threads, "inter_op_num_threads": 1,
                         "execution_mode": "ORT_SEQUENTIAL", "allow_spinning": config.allow_spinning},
        versions=_versions())
    meta.save(out)
    return meta


def trace_onnx(model: torch.nn.Module, inputs: dict[str, torch.Tensor], output: str,
               steerable: dict[str, torch.Tensor], config: OnnxExportConfig = OnnxExportConfig()):
    """Any module whose attention `graph.fused_attention` swaps -> ModelProto with one fused attention
    node per attention layer. `inputs` (name -> example tensor, in forward() order) are the graph's
    inputs; `steerable` (parameter name -> value) become initializers named `input_name(param)` that
    hold those values: not graph inputs, so a plain session runs the file alone, constant-folds them
    and warns of nothing. An engine that switches steering makes them inputs (`steerable_as_inputs`)."""
    names = list(steerable)
    in_names = list(inputs) + [input_name(n) for n in names]
    dynamic = {k: {0: "batch"} for k in (*inputs, output)} if config.dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")   # the TorchScript exporter's deprecation notice, tracer warnings
        # the wrapper in the model's own mode: the exporter traces in eval mode, then restores the
        # wrapper's mode recursively, which would otherwise leave the model in training mode
        torch.onnx.export(ExportGraph(model, names).train(model.training), (*inputs.values(), *steerable.values()), buf, dynamo=False,
                          opset_version=config.opset, input_names=in_names, output_names=[output],
                          dynamic_axes=dynamic, custom_opsets={FUSED_DOMAIN: 1}, do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name, proto.producer_version = "edge-steer", _version()
    if config.precision == "fp16":       # while the steerable weights are inputs: they stay float32
        proto = _to_fp16(proto)
    used = {i for node in proto.graph.node for i in node.input}
    unused = [n for n in names if input_name(n) not in used]
    if unused:
        raise ExportError(f"steerable parameters {unused[:3]} do not reach the graph (not used by forward?)")
    keep = [i for i in proto.graph.input if i.name not in {input_name(n) for n in names}]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    for n, t in steerable.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(t.detach().float().cpu().numpy(), input_name(n)))
    onnx.checker.check_model(proto)
    return proto


def steerable_as_inputs(proto, names: list[str]):
    """A copy of `proto` whose initializers `names` are graph inputs without defaults (what an engine
    that feeds the steerable weights on every run, or TensorRT, needs)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    found = {t.name: t for t in g.initializer if t.name in set(names)}
    missing = set(names) - set(found)
    if missing:
        raise ExportError(f"the graph has no steerable weights named {sorted(missing)[:3]}: re-export it")
    keep = [t for t in g.initializer if t.name not in found]
    del g.initializer[:]
    g.initializer.extend(keep)
    g.input.extend(onnx.helper.make_tensor_value_info(n, found[n].data_type, list(found[n].dims)) for n in names)
    return out


def check_fused(proto, n_layers: int, other_softmax: int = 0) -> Counter:
    """Op counts of the graph; raises unless attention is exactly one fused node per layer and the
    only Softmax nodes are the `other_softmax` ones outside attention."""
    counts = Counter(n.op_type for n in proto.graph.node)
    fused = sum(1 for n in proto.graph.node if n.op_type == FUSED_OP and n.domain == FUSED_DOMAIN)
    if fused != n_layers or counts["Softmax"] != other_softmax:
        raise ExportError(f"expected {n_layers} fused {FUSED_DOMAIN}.{FUSED_OP} nodes and {other_softmax} Softmax, got "
                          f"{fused} fused and {counts['Softmax']} Softmax: attention was not fused")
    return counts


def _specs(inputs: dict[str, torch.Tensor], dynamic: bool) -> list[TensorSpec]:
    out = []
    for k, t in inputs.items():
        shape: list[int | str] = list(t.shape)
        if dynamic:
            shape[0] = "batch"
        out.append(TensorSpec(k, shape, str(t.numpy().dtype)))
    return out


def _to_fp16(proto):
    """Half-precision weights and compute; graph inputs/outputs stay float32 (casts at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=True)
    _toposort(proto.graph)           # the converter appends its input casts at the end
    return proto


def _toposort(graph) -> None:
    """Reorder nodes so each comes after the producers of its inputs (stable otherwise)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ExportError(f"graph has a cycle or dangling inputs at {rest[0].name}")
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("edge-steer")
    except PackageNotFoundError:
        return "dev"


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    return {"edge_steer": _version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def describe(meta: EngineMeta) -> dict[str, Any]:
    """A short, printable summary of an export (what the CLI shows)."""
    return {"engine": meta.engine_file, "backend": meta.backend, "precision": meta.precision,
            "base": meta.base_fingerprint[:12], "steering": (meta.steering_hash or "none")[:12],
            "fused_attention_nodes": meta.fused_attention.get("nodes"),
            "inputs": {s.name: s.shape for s in meta.inputs}, "defaults": meta.defaults,
            "steerable_inputs": len(meta.steerable)}


__all__ = ["ExportError", "OnnxExportConfig", "check_fused", "describe", "example_inputs", "export_onnx", "model_inputs",
           "steerable_as_inputs", "trace_onnx"]
