"""The CUDA-graph engine (issue 48): what a machine without a GPU can check. Without CUDA it refuses
with a clear message; its static-buffer path (the export's graph, steerable weights as buffers that a
steering switch copies into) runs eagerly on the CPU with the reference attention, and there it must
match the torch model, base and steered, switching both ways. The kernel and the capture itself are
checked on a GPU by tools/gpu_check.sh (and the `gpu` test below)."""

from __future__ import annotations

import pytest
import torch

from edge_steer.export.metadata import EngineError
from edge_steer.models import HeadRef
from edge_steer.runtime.engine import CudaGraphEngine, Engine, load_engine
from edge_steer.steering.delta import DeltaError
from triton_subprocess import NO_TRITON, kernel_env
from test_export import RTOL, observation, rel_err, steered_delta, tiny

HAS_GPU = torch.cuda.is_available()


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present")
def test_without_cuda_the_backend_refuses_clearly(tmp_path):
    model = tiny()
    with pytest.raises(EngineError, match="needs an NVIDIA GPU and a CUDA build of torch"):
        CudaGraphEngine(model)
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(EngineError, match="needs an NVIDIA GPU"):
        load_engine(tmp_path / "ckpt", backend="cuda-graph")
    with pytest.raises(EngineError, match="captured on a CUDA device only"):
        CudaGraphEngine(model, device="cpu", capture=True)


def test_static_buffers_and_steering_switch_match_torch_on_cpu():
    model = tiny(seed=2)
    engine = CudaGraphEngine(model, device="cpu", capture=False)
    assert isinstance(engine, Engine) and engine.metadata()["cuda_graph"] is False
    obs, text = observation(3), "put the red cube on the blue plate"
    assert rel_err(engine.predict(obs, text), model.predict(obs, text)) <= RTOL
    d1, d2 = steered_delta(model, seed=1), steered_delta(model, heads=(HeadRef(1, 0),), which="qkvo", seed=2)
    for d in (d1, d2, None, d1):
        engine.set_steering(d)
        ref = model if d is None else d.tuned
        assert rel_err(engine.predict(obs, text), ref.predict(obs, text)) <= RTOL
        assert engine.metadata()["steering_hash"] == (None if d is None else d.hash())
    with pytest.raises(DeltaError, match="trained on base model"):
        engine.set_steering(steered_delta(tiny(seed=9)))
    with pytest.raises(ValueError, match="captured for"):
        x = engine.inputs(obs, text)
        engine.run({**x, "state": x["state"][:, :3]})
    assert rel_err(engine.predict(obs, text), d1.tuned.predict(obs, text)) <= RTOL   # a refusal changed nothing


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_cuda_graph_engine_on_gpu_matches_torch():
    model = tiny(seed=2)
    engine = CudaGraphEngine(model)
    obs, text = observation(3), "go"
    assert engine.metadata()["cuda_graph"] is True
    assert rel_err(engine.predict(obs, text), model.predict(obs, text)) <= 1e-4
    d = steered_delta(model)
    engine.set_steering(d)
    assert rel_err(engine.predict(obs, text), d.tuned.predict(obs, text)) <= 1e-4


@pytest.mark.skipif(kernel_env() is None, reason=NO_TRITON)
def test_gpu_check_script_dry_runs_on_the_cpu(tmp_path):
    """tools/gpu_check.sh --cpu-smoke: the GPU script's own code at toy sizes, the Triton kernel (alone
    and as the attention of a whole model) under the interpreter; TensorRT reported as skipped."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu_check.json"
    r = subprocess.run(["bash", str(root / "tools" / "gpu_check.sh"), "--cpu-smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env={**kernel_env(), "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["ok"] and res["mode"] == "cpu-smoke"
    assert res["kernel"]["cases"][0]["rel_err"] < 1e-5
    assert res["cuda_graph_engine"]["rel_err"] < 1e-5 and res["cuda_graph_engine"]["attention"] == "triton (interpreter)"
    if "tensorrt" not in sys.modules:
        assert "skipped" in res["tensorrt"]
    assert "tensorrt: skipped" in r.stdout
