"""The TensorRT path and the fused-attention plugin, as far as a CPU machine can check them: the op
contract (numpy reference = onnxruntime's fused node = the model's attention), the Triton kernel
under Triton's CPU interpreter, the ONNX rewrite the plan is built from, the cache key, the target
checks, and clear errors without TensorRT / a GPU / the plugin. `gpu` tests build and run a plan."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edge_steer.export import EngineError, export_onnx
from edge_steer.export.graph import attention_reference
from edge_steer.export.metadata import EngineMeta, sidecar_path
from edge_steer.export.onnx_export import example_inputs
from edge_steer.export.tensorrt import (PluginError, TrtBuildConfig, cache_key, check_plan_target, load_plugin,
                                        plugin_dir, plugin_hash, rewrite_for_tensorrt)

import edge_steer.engines.fused_attention as fa
from triton_subprocess import NO_TRITON, kernel_env
from test_export import RTOL, rel_err, tiny

ENGINES = Path(fa.__file__).resolve().parents[1]

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_GPU = torch.cuda.is_available()


def random_case(b, s, h, d, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(b, s, h * d)).astype(dtype) for _ in range(3))
    mask = np.ones((b, s), np.int32)
    mask[:, s // 3: s // 2] = 0
    mask[-1, :2] = 0
    return q, k, v, mask


def ort_fused(q, k, v, mask, num_heads, scale):
    """Run one com.microsoft::MultiHeadAttention node: the node the plugin replaces."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "m"], ["o"], domain="com.microsoft",
                            num_heads=num_heads, scale=scale)
    shape = list(q.shape)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"]
                          + [helper.make_tensor_value_info("m", TensorProto.INT32, shape[:2])],
                          [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"q": q, "k": k, "v": v, "m": mask})[0]


@pytest.mark.parametrize("shape", [(1, 37, 4, 8), (2, 99, 8, 16)])
def test_plugin_contract_reference_matches_onnxruntime_and_torch(shape):
    b, s, h, d = shape
    q, k, v, mask = random_case(b, s, h, d)
    ref = fa.reference(q, k, v, mask, h, d ** -0.5)
    assert rel_err(ort_fused(q, k, v, mask, h, d ** -0.5), ref) < 1e-5
    t = attention_reference(*(torch.from_numpy(x) for x in (q, k, v, mask)), h, d ** -0.5).numpy()
    assert rel_err(t, ref) < 1e-5
    with pytest.raises(ValueError, match="key_mask"):
        fa.reference(q, k, v, mask[:, :-1], h, 1.0)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        fa.reference(q, k, v, mask, h + 1, 1.0)


@pytest.mark.skipif(kernel_env() is None, reason=NO_TRITON)
def test_triton_kernel_matches_reference_in_the_interpreter():
    """check_plugin.py --interpret: the kernel's own code, run by Triton's CPU interpreter (a subprocess:
    TRITON_INTERPRET must be set before triton is first imported, and triton stays out of this process)."""
    import subprocess
    r = subprocess.run([sys.executable, str(ENGINES / "check_plugin.py"), "--interpret"], capture_output=True, text=True,
                       env={**kernel_env(), "TRITON_INTERPRET": "1"}, timeout=120)
    assert r.returncode == 0 and "all checks passed" in r.stdout, r.stdout + r.stderr


@pytest.fixture(scope="module")
def onnx_engine(tmp_path_factory):
    model = tiny(seed=1)
    path = tmp_path_factory.mktemp("trt") / "policy.onnx"
    return model, path, export_onnx(model, path)


def test_rewrite_retypes_attention_to_the_plugin(onnx_engine):
    model, path, meta = onnx_engine
    steer = [s.input for s in meta.steerable]
    proto = rewrite_for_tensorrt(onnx.load(str(path)), steer)
    nodes = [n for n in proto.graph.node if n.op_type == "fused_attention"]
    assert len(nodes) == model.config.n_layers
    assert not [n for n in proto.graph.node if n.op_type == "MultiHeadAttention"]
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_namespace"] == b"edge_steer" and attrs["num_heads"] == model.config.n_heads
        assert attrs["scale"] == pytest.approx(model.config.head_dim ** -0.5) and len(n.input) == 4
    inits = {t.name for t in proto.graph.initializer}
    assert not inits & set(steer)                                   # steerable weights are plain inputs
    assert set(steer) <= {i.name for i in proto.graph.input}
    with pytest.raises(EngineError, match="no fused attention"):
        rewrite_for_tensorrt(proto, steer)


def test_cache_key_covers_everything_a_plan_depends_on():
    gpu = {"name": "NVIDIA RTX 4000 Ada", "compute_capability": "8.9"}
    base = cache_key("a" * 64, "fp16", gpu, "10.9.0", "p" * 64)
    assert base == cache_key("a" * 64, "fp16", dict(gpu), "10.9.0", "p" * 64)
    variants = [cache_key("b" * 64, "fp16", gpu, "10.9.0", "p" * 64), cache_key("a" * 64, "bf16", gpu, "10.9.0", "p" * 64),
                cache_key("a" * 64, "fp16", {**gpu, "name": "Orin"}, "10.9.0", "p" * 64),
                cache_key("a" * 64, "fp16", {**gpu, "compute_capability": "8.7"}, "10.9.0", "p" * 64),
                cache_key("a" * 64, "fp16", gpu, "10.10.0", "p" * 64), cache_key("a" * 64, "fp16", gpu, "10.9.0", "q" * 64),
                cache_key("a" * 64, "fp16", gpu, "10.9.0", "p" * 64, max_batch=8)]
    assert len({base, *variants}) == len(variants) + 1
    assert len(plugin_hash()) == 64
    with pytest.raises(ValueError, match="precision"):
        TrtBuildConfig(precision="int4")


def test_plan_target_checks():
    meta = EngineMeta(backend="tensorrt", engine_file="p.plan", engine_sha256="", base_fingerprint="", model_config={},
                      normalisation={}, inputs=[], outputs=[], steerable=[], base_file="", base_sha256="",
                      tensorrt={"gpu": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7", "version": "10.9.0"})
    here = {"name": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7"}
    check_plan_target(meta, here, "10.9.0")
    with pytest.raises(EngineError, match="built with TensorRT 10.9.0, this machine has 10.11.0"):
        check_plan_target(meta, here, "10.11.0")
    with pytest.raises(EngineError, match="built for NVIDIA Jetson AGX Orin .*this machine has NVIDIA L4"):
        check_plan_target(meta, {"name": "NVIDIA L4", "compute_capability": "8.9"}, "10.9.0")


def test_missing_plugin_tensorrt_or_gpu_is_a_clear_error(onnx_engine, tmp_path, monkeypatch):
    _, path, _ = onnx_engine
    with pytest.raises(PluginError, match="plugin is missing"):
        load_plugin(tmp_path / "nowhere")
    monkeypatch.setenv("EDGE_STEER_ENGINES", str(tmp_path / "nowhere"))
    assert plugin_dir() == tmp_path / "nowhere"
    with pytest.raises(PluginError, match="plugin is missing"):
        plugin_hash()
    monkeypatch.delenv("EDGE_STEER_ENGINES")
    if HAS_TRT and HAS_GPU:
        pytest.skip("TensorRT and a GPU are present: the gpu tests cover the real path")
    from edge_steer.export.tensorrt import build_engine
    with pytest.raises(EngineError, match="TensorRT is not installed|no CUDA GPU"):
        build_engine(path, tmp_path / "p.plan")
    # a plan-shaped file with a TensorRT sidecar: the engine refuses it before touching the GPU
    from edge_steer.runtime.engine import TensorRTEngine, load_engine
    plan = tmp_path / "p.plan"
    plan.write_bytes(b"not a real plan")
    shutil.copyfile(path.with_name(path.name + ".base.safetensors"), tmp_path / "p.plan.base.safetensors")
    side = json.loads(sidecar_path(path).read_text())
    from edge_steer.files import file_sha256
    side.update(backend="tensorrt", engine_file="p.plan", engine_sha256=file_sha256(plan), base_file="p.plan.base.safetensors",
                tensorrt={"gpu": "NVIDIA L4", "compute_capability": "8.9", "version": "10.9.0"})
    sidecar_path(plan).write_text(json.dumps(side))
    with pytest.raises(EngineError, match="TensorRT is not installed|no CUDA GPU"):
        load_engine(plan)
    with pytest.raises(EngineError, match="is a tensorrt engine, not onnxruntime"):
        from edge_steer.runtime.engine import OnnxEngine
        OnnxEngine(plan)
    assert TensorRTEngine.backend == "tensorrt"


# --- on a GPU with TensorRT ------------------------------------------------------------------------
gpu = pytest.mark.skipif(not (HAS_TRT and HAS_GPU), reason="needs an NVIDIA GPU and tensorrt>=10.9")


@pytest.mark.gpu
@gpu
def test_kernel_and_plugin_plan_on_gpu_match_reference():
    import subprocess
    r = subprocess.run([sys.executable, str(ENGINES / "check_plugin.py"), "--gpu", "--trt"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "all checks passed" in r.stdout, r.stdout + r.stderr


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-3), ("fp16", 2e-2)])
def test_tensorrt_engine_parity_and_steering(onnx_engine, tmp_path, precision, tol):
    from edge_steer.export.tensorrt import build_engine
    from edge_steer.runtime.engine import load_engine
    from test_export import observation, steered_delta
    model, path, _ = onnx_engine
    build_engine(path, tmp_path / "p.plan", TrtBuildConfig(precision=precision, cache_dir=tmp_path / "cache"))
    engine = load_engine(tmp_path / "p.plan")
    x = example_inputs(model.config, seed=5)
    with torch.no_grad():
        ref = model(**x).numpy()
    assert rel_err(engine.run({k: v.numpy() for k, v in x.items()}), ref) < tol
    d = steered_delta(model)
    engine.set_steering(d)
    obs = observation(3)
    assert rel_err(engine.predict(obs, "go"), d.tuned.predict(obs, "go")) < tol
    onnx_out = load_engine(path)
    onnx_out.set_steering(d)
    assert rel_err(engine.predict(obs, "go"), onnx_out.predict(obs, "go")) < tol
    assert RTOL <= tol


def test_the_plugin_ships_in_the_wheel_and_imports_nothing_of_edge_steer(tmp_path):
    """Issue 48: an installed wheel has the plugin (it lived outside the package before), and the
    plugin room stays independent of edge_steer (only its own relative imports)."""
    import ast
    import subprocess
    import zipfile
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(root)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = tmp_path.glob("edge_steer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("__init__.py", "contract.py", "kernel.py", "plugin.py"):
        assert f"edge_steer/engines/fused_attention/{f}" in names
    assert "edge_steer/engines/check_plugin.py" in names
    for f in (ENGINES / "fused_attention").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.startswith("edge_steer") for m in mods), f"{f.name} imports {mods}"
    assert plugin_dir() == ENGINES
