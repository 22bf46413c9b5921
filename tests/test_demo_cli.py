"""`edge-steer demo`, the README's first command, end to end on a small budget: it must not break
silently (it once did, through an option its direct call to `demos generate` left unset; its stages now
call plain functions with explicit arguments)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edge_steer.cli import app

pytestmark = pytest.mark.timeout(420)


def test_demo_runs_every_stage_on_a_small_budget(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--episodes", "2", "--eval-episodes", "1",
                                 "--steps", "3", "--serve-seconds", "3"])
    assert r.exit_code == 0, f"{r.output}\n{r.exception!r}"
    for f in ("demos/meta/info.json", "heads.json", "steer/steering.safetensors", "report/report.md",
              "steered.onnx", "eval_before.json", "eval_after.json", "serve_status.json"):
        assert (out / f).is_file(), f
    assert "zero-shot ->" in r.output and "after steering (ONNX engine)" in r.output
    assert "served: 'put the purple cylinder in the yellow bowl'" in r.output
    assert len(json.loads((out / "heads.json").read_text())["selected"]) == 6
    status = json.loads((out / "serve_status.json").read_text())
    assert status["engine"]["backend"] == "onnxruntime"

