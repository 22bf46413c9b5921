"""`edge-steer export`: a (steered) model to an ONNX or TensorRT engine with its metadata sidecar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from edge_steer.cli._common import _fail


def export_cmd(model: Optional[Path] = typer.Option(None, help="checkpoint directory (default: embedded model)"),
               steering: Optional[Path] = typer.Option(None, help="steering delta (.safetensors) to bake in"),
               format: str = typer.Option("onnx", "--format", help="onnx | trt"),
               out: Path = typer.Option(..., help="engine file: .onnx, or .plan for trt (its .onnx is written beside)"),
               dynamic_batch: bool = typer.Option(False, help="dynamic batch axis (default: static batch 1)"),
               steerable: str = typer.Option("qo", help="projections switchable at run time without re-export"),
               precision: str = typer.Option("fp32", help="onnx: fp32 | fp16; trt: fp32 | fp16 | bf16")) -> None:
    """Export the (steered) model to an engine with a metadata sidecar, then check it loads and predicts."""
    from edge_steer.models import CheckpointError, load_model

    if format not in ("onnx", "trt"):
        _fail(f"--format must be onnx or trt, got {format!r}")
    try:
        m = load_model(model)
    except (CheckpointError, ValueError) as e:
        _fail(escape(str(e)))
    run_export(m, out, steering, format, dynamic_batch, steerable, precision)


def run_export(model, out: Path, steering: Optional[Path], format: str = "onnx", dynamic_batch: bool = False,
               steerable: str = "qo", precision: str = "fp32") -> None:
    """export_engine, then the engine loaded back (it must load and predict); one JSON line describes it."""
    from edge_steer.export import EngineError, ExportError, export_engine
    from edge_steer.export.onnx_export import describe
    from edge_steer.runtime.engine import load_engine
    from edge_steer.steering.delta import DeltaError

    try:
        meta = export_engine(model, out, steering, format, dynamic_batch, steerable, precision)
        engine = load_engine(out)
    except (DeltaError, EngineError, ExportError, ValueError) as e:
        _fail(escape(str(e)))
    print(json.dumps({**describe(meta), "load_seconds": round(engine.load_seconds, 3), "sidecar": str(out) + ".json"}))
