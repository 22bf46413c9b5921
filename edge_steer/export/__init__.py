"""Export: a (steered) model of the VLA protocol (EdgeVLA, HFVLA) to ONNX with fused attention
(onnxruntime), then to a TensorRT plan whose attention runs our plugin in `edge_steer/engines/`. Every
engine carries a metadata sidecar; the runtime backends that load them live in `edge_steer.runtime.engine`.
TensorRT is imported lazily."""

from edge_steer.export.metadata import EngineError, EngineMeta
from edge_steer.export.onnx_export import ExportError, OnnxExportConfig, check_fused, export_onnx

__all__ = ["EngineError", "EngineMeta", "ExportError", "OnnxExportConfig", "check_fused", "export_onnx"]
