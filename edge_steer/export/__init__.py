"""Export: a (steered) model of the VLA protocol (EdgeVLA, HFVLA) to ONNX with fused attention
(onnxruntime), then to a TensorRT plan whose attention runs our plugin in `edge_steer/engines/`. Every
engine carries a metadata sidecar; the runtime backends that load them live in `edge_steer.runtime.engine`.
TensorRT is imported lazily."""

from edge_steer.export.metadata import EngineError, EngineMeta
from edge_steer.export.onnx_export import ExportError, OnnxExportConfig, check_fused, export_onnx

__all__ = ["EngineError", "EngineMeta", "ExportError", "OnnxExportConfig", "check_fused", "export_engine", "export_onnx"]


def export_engine(model, out, steering=None, format: str = "onnx", dynamic_batch: bool = False,
                  steerable: str = "qo", precision: str = "fp32") -> EngineMeta:
    """The model (with the steering delta at `steering` baked in) as an engine at `out`: ONNX, or for
    `format="trt"` a TensorRT plan built from an ONNX file written beside it (`out` with suffix .onnx);
    `precision` is the ONNX graph's for onnx, the plan's for trt. Returns the engine's metadata."""
    from pathlib import Path

    if format not in ("onnx", "trt"):
        raise ExportError(f"format must be onnx or trt, got {format!r}")
    out = Path(out)
    onnx_out = out if format == "onnx" else out.with_suffix(".onnx")
    meta = export_onnx(model, onnx_out, steering, OnnxExportConfig(
        dynamic_batch=dynamic_batch, steerable=steerable, precision=precision if format == "onnx" else "fp32"))
    if format == "trt":
        from edge_steer.export.tensorrt import TrtBuildConfig, build_engine
        meta = build_engine(onnx_out, out, TrtBuildConfig(precision=precision))
    return meta
