"""Export a (steered) EdgeVLA to ONNX for onnxruntime, with one fused attention node per layer.

How the fusion is done: `graph.fused_attention` swaps each attention layer's forward, for the trace
only, for one whose core is an autograd Function with an ONNX `symbolic` that emits
`com.microsoft::MultiHeadAttention` (torch.onnx's TorchScript exporter, which needs no extra
package). `check_fused` then counts the nodes: exactly one per layer, and no attention Softmax left
(the one Softmax a keypoint stem has is over its feature maps, not attention).

Steering: the q/o projections (or those named by `steerable`) of every layer are graph inputs whose
default values (ONNX initialisers of the same names) are the base weights, so the file runs alone,
and an engine overrides them per delta. The delta given at export is stored beside the engine and
applied at load; the base values are kept too, so the engine can also switch back to the base.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from edge_steer.export.graph import FUSED_DOMAIN, FUSED_OP, PROJECTIONS, ExportGraph, input_name, steerable_params
from edge_steer.export.metadata import EngineMeta, SteerableSpec, TensorSpec, base_path, steering_path
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


def export_onnx(model, out: str | Path, steering: SteeringDelta | str | Path | None = None,
                config: OnnxExportConfig = OnnxExportConfig()) -> EngineMeta:
    """Write `out` (.onnx), its sidecar and the steerable base weights; returns the sidecar."""
    import onnx

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
        projections += "".join(p for p in PROJECTIONS if p not in projections
                               and any(f".{p}_proj." in name for name, _ in delta.tensors))
    names = steerable_params(model, projections)
    params = dict(model.named_parameters())
    base = {n: params[n].detach().float().contiguous() for n in names}
    inputs = example_inputs(model.config)
    graph = ExportGraph(model, names)
    in_names = list(INPUTS) + [input_name(n) for n in names]
    dynamic = {k: {0: "batch"} for k in (*INPUTS, OUTPUT)} if config.dynamic_batch else None

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")   # the TorchScript exporter's deprecation notice
        torch.onnx.export(graph, (*inputs.values(), *base.values()), buf, dynamo=False,
                          opset_version=config.opset, input_names=in_names, output_names=[OUTPUT],
                          dynamic_axes=dynamic, custom_opsets={FUSED_DOMAIN: 1}, do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    # base weights as defaults of the steerable inputs: the file runs alone; engines override them
    for n in names:
        proto.graph.initializer.append(onnx.numpy_helper.from_array(base[n].numpy(), input_name(n)))
    proto.producer_name, proto.producer_version = "edge-steer", _version()
    if config.precision == "fp16":
        proto = _to_fp16(proto, [input_name(n) for n in names])
    counts = check_fused(proto, model.config.n_layers, other_softmax=int(model.config.keypoints > 0))
    onnx.checker.check_model(proto)
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))

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
        inputs=_specs(inputs, config.dynamic_batch) + [TensorSpec(input_name(n), list(base[n].shape), "float32")
                                                      for n in names],
        outputs=[TensorSpec(OUTPUT, ["batch" if config.dynamic_batch else 1, model.config.chunk,
                                     model.config.action_dim], "float32")],
        steerable=[SteerableSpec(n, input_name(n), list(base[n].shape)) for n in names],
        base_file=base_path(out).name, base_sha256=file_sha256(base_path(out)),
        precision=config.precision, opset=config.opset, dynamic_batch=config.dynamic_batch,
        fused_attention={"op": FUSED_OP, "domain": FUSED_DOMAIN, "nodes": counts[FUSED_OP],
                         "steerable_projections": projections},
        steering_hash=delta.hash() if delta is not None else None, steering_file=steering_file,
        language_fingerprint=_language_fingerprint(model.config),
        preprocessing={"images": "uint8 HWC -> float /255, bilinear antialiased resize to image_size, (x - 0.5) / 0.25, "
                                 "cameras stacked in model_config.cameras order",
                       "state": "(x - state_mean) / state_std",
                       "language": f"{model.config.language}: cached per instruction on the host, outside the graph",
                       "actions": "graph output * action_std + action_mean",
                       "code": "edge_steer.models.vla.prepare_inputs / action_chunk"},
        session_options={"graph_optimization_level": config.graph_optimization,
                         "intra_op_num_threads": config.intra_op_threads, "inter_op_num_threads": 1,
                         "execution_mode": "ORT_SEQUENTIAL", "allow_spinning": config.allow_spinning},
        versions=_versions())
    meta.save(out)
    return meta


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


def _to_fp16(proto, keep_float: list[str]):
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


def _language_fingerprint(config) -> str | None:
    if config.language != "minilm":
        return None
    from edge_steer.models.language import minilm_fingerprint
    return minilm_fingerprint()


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
            "inputs": {s.name: s.shape for s in meta.inputs if not s.name.startswith("steer.")},
            "steerable_inputs": len(meta.steerable)}


__all__ = ["ExportError", "OnnxExportConfig", "check_fused", "describe", "example_inputs", "export_onnx"]
