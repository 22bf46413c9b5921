"""ONNX export and the onnxruntime engine: fused attention (node count), parity with torch on random
and real (sim-rendered) inputs, static and dynamic batch, steering switches without re-export, the
metadata sidecar, backend selection, and clear errors for bad input."""

from __future__ import annotations

import json
import time

import numpy as np
import onnx
import pytest
import torch

from edge_steer.export import EngineError, ExportError, OnnxExportConfig, check_fused, export_onnx
from edge_steer.export.graph import attention_reference
from edge_steer.export.metadata import EngineMeta, sidecar_path
from edge_steer.export.onnx_export import example_inputs
from edge_steer.models import EdgeVLA, EdgeVLAConfig, HeadRef
from edge_steer.runtime.engine import Engine, OnnxEngine, TorchEngine, load_engine
from edge_steer.steering.delta import DeltaError, SteeringDelta

# grouped-query attention on purpose: the export must repeat kv heads for the fused node
TINY = dict(image_size=32, stem_channels=(4, 8), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
            mlp_ratio=2.0, chunk=4, language="embedding", max_lang_tokens=8, lang_buckets=64)
STATS = {"action": {"mean": np.linspace(-0.1, 0.1, 7), "std": np.full(7, 0.05)},
         "observation.state": {"mean": np.linspace(0.0, 0.5, 8), "std": np.full(8, 0.2)}}
RTOL = 1e-4


def tiny(seed: int = 0, **kw) -> EdgeVLA:
    torch.manual_seed(seed)
    m = EdgeVLA(EdgeVLAConfig(**{**TINY, **kw}))
    m.set_stats(STATS)
    return m.eval()


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the error relative to the output's scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def observation(seed: int = 0, size: int = 40) -> dict:
    rng = np.random.default_rng(seed)
    obs = {f"observation.images.{c}": rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for c in ("front", "wrist")}
    obs["observation.state"] = rng.normal(0.2, 0.3, 8).astype(np.float32)
    return obs


def steered_delta(model: EdgeVLA, heads=(HeadRef(0, 1), HeadRef(1, 3)), which: str = "qo", seed: int = 1) -> SteeringDelta:
    """A delta as a steer fine-tune would write: new values for the q/o slices of a few heads."""
    tuned = EdgeVLA(model.config).eval()
    tuned.load_state_dict(model.state_dict())
    slices = [s for h in tuned.heads() if h.ref in heads for s in h.slices(which)]
    g = torch.Generator().manual_seed(seed)
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        for s in slices:
            p = params[s.param]
            idx = torch.arange(s.start, s.stop)
            p.index_add_(s.dim, idx, 0.5 * torch.randn(p.index_select(s.dim, idx).shape, generator=g))
    delta = SteeringDelta.from_model(tuned, slices, model.fingerprint(), {"heads": [str(h) for h in heads]}, which)
    delta.tuned = tuned          # the fine-tuned model itself, for parity checks
    return delta


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny()
    path = tmp_path_factory.mktemp("onnx") / "policy.onnx"
    meta = export_onnx(model, path)
    return model, path, meta


def test_attention_is_one_fused_node_per_layer(exported):
    model, path, meta = exported
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    fused = [n for n in proto.graph.node if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"]
    assert len(fused) == model.config.n_layers == meta.fused_attention["nodes"]
    assert "Softmax" not in ops
    # nothing of an unfused attention is left: every MatMul is a projection fed by a LayerNorm / MHA / GELU
    # path, none multiplies activations by activations (q @ k^T or w @ v)
    produced_by = {o: n for n in proto.graph.node for o in n.output}
    weights = {t.name for t in proto.graph.initializer} | {i.name for i in proto.graph.input if i.name.startswith("steer.")}
    for n in proto.graph.node:
        if n.op_type == "MatMul":
            b = n.input[1]
            src = produced_by.get(b)
            assert b in weights or (src is not None and src.op_type in ("Transpose", "Identity", "Constant")), \
                f"{n.name} multiplies two activations: {n.input}"
    for n in fused:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["num_heads"] == model.config.n_heads
        assert attrs["scale"] == pytest.approx(model.config.head_dim ** -0.5)
    check_fused(proto, model.config.n_layers)
    with pytest.raises(ExportError, match="not fused"):
        check_fused(proto, model.config.n_layers + 1)


def test_fused_node_contract_matches_torch_attention():
    """The op the node stands for (attention_reference) is what the model's attention computes."""
    from edge_steer.models.attention import Attention
    torch.manual_seed(0)
    attn = Attention(32, 4, 2, 8).eval()
    x = torch.randn(2, 11, 32)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 2:5] = False
    from edge_steer.export.graph import fused_attention
    with torch.no_grad():
        ref = attn(x, mask)
        with fused_attention(attn):
            out = attn(x, mask)
    assert "forward" not in attn.__dict__      # the override is gone after the block
    assert rel_err(out, ref) < 1e-6
    q = torch.randn(1, 5, 16)
    assert attention_reference(q, q, q, torch.ones(1, 5, dtype=torch.int32), 2, 0.25).shape == q.shape


def test_parity_random_and_real_inputs(exported):
    model, path, _ = exported
    engine = load_engine(path)
    assert isinstance(engine, OnnxEngine) and isinstance(engine, Engine)
    for seed in range(3):                      # random normalised graph inputs
        x = example_inputs(model.config, seed=seed)
        with torch.no_grad():
            ref = model(**x).numpy()
        assert rel_err(engine.run({k: v.numpy() for k, v in x.items()}), ref) <= RTOL
    for seed in range(2):                      # random raw observations through the shared preprocessing
        obs = observation(seed)
        assert rel_err(engine.predict(obs, "put the red cube on the blue plate"),
                       model.predict(obs, "put the red cube on the blue plate")) <= RTOL
    # a real frame: the simulated cell's cameras and robot state, and a task instruction
    from edge_steer.sim.env import EnvConfig, SimEnv
    from edge_steer.sim.tasks import tasks_by_split
    task = tasks_by_split("base")[0]
    with SimEnv(task, 0, EnvConfig()) as env:
        obs = env.observe()
    a, b = engine.predict(obs, task.instruction), model.predict(obs, task.instruction)
    assert a.shape == (model.config.chunk, model.config.action_dim)
    assert rel_err(a, b) <= RTOL


def test_parity_with_keypoint_tokens(tmp_path):
    model = tiny(seed=3, keypoints=4)
    export_onnx(model, tmp_path / "kp.onnx")
    engine = load_engine(tmp_path / "kp.onnx")
    obs = observation(seed=5)
    assert rel_err(engine.predict(obs, "put the red cube on the blue plate"),
                   model.predict(obs, "put the red cube on the blue plate")) <= RTOL


def test_dynamic_batch(tmp_path):
    model = tiny(seed=2)
    meta = export_onnx(model, tmp_path / "dyn.onnx", config=OnnxExportConfig(dynamic_batch=True))
    assert meta.inputs[0].shape[0] == "batch"
    engine = load_engine(tmp_path / "dyn.onnx")
    for b in (1, 3):
        x = example_inputs(model.config, batch=b, seed=b)
        with torch.no_grad():
            ref = model(**x).numpy()
        out = engine.run({k: v.numpy() for k, v in x.items()})
        assert out.shape == (b, model.config.chunk, model.config.action_dim)
        assert rel_err(out, ref) <= RTOL


def test_steering_switches_without_reexport(exported, tmp_path):
    model, path, _ = exported
    engine = load_engine(path)
    base_out = engine.predict(observation(5), "push the block")
    d1, d2 = steered_delta(model, seed=1), steered_delta(model, heads=(HeadRef(1, 0),), seed=2)
    for d in (d1, d2, None, d2, d1):
        t0 = time.perf_counter()
        engine.set_steering(d)
        switch = time.perf_counter() - t0
        assert switch < 0.05
        ref_model = model if d is None else d.tuned
        assert rel_err(engine.predict(observation(5), "push the block"), ref_model.predict(observation(5), "push the block")) <= RTOL
        assert engine.metadata()["steering_hash"] == (d.hash() if d is not None else None)
    engine.set_steering(None)
    assert np.array_equal(engine.predict(observation(5), "push the block"), base_out)   # exactly back to base
    # a delta file path works too, and the torch engine agrees
    d1.save(tmp_path / "d1.safetensors")
    engine.set_steering(tmp_path / "d1.safetensors")
    torch_engine = TorchEngine(tiny(), steering=tmp_path / "d1.safetensors")
    assert rel_err(engine.predict(observation(6), "x"), torch_engine.predict(observation(6), "x")) <= RTOL


def test_steering_baked_at_export_and_k_delta(tmp_path):
    model = tiny(seed=3)
    d = steered_delta(model, which="qkvo")          # touches k/v too: export makes them steerable
    meta = export_onnx(model, tmp_path / "s.onnx", steering=d)
    assert meta.steering_hash == d.hash() and meta.fused_attention["steerable_projections"] == "qokv"
    engine = load_engine(tmp_path / "s.onnx")
    obs = observation(7)
    assert rel_err(engine.predict(obs, "go"), d.tuned.predict(obs, "go")) <= RTOL
    engine.set_steering(None)
    assert rel_err(engine.predict(obs, "go"), model.predict(obs, "go")) <= RTOL
    assert load_engine(tmp_path / "s.onnx", steering=None).metadata()["steering_hash"] is None


def test_steered_file_alone_computes_the_steered_model_quietly(tmp_path, capfd):
    """Issue 48: a steered .onnx run by a plain onnxruntime session (no sidecar, no engine) computes the
    steered model; its declared inputs are the sidecar's; loading it prints nothing; the engine still
    switches to other deltas and back to the base."""
    import onnxruntime as ort
    model = tiny(seed=6)
    d = steered_delta(model)
    base_meta = export_onnx(model, tmp_path / "base.onnx")
    meta = export_onnx(model, tmp_path / "steer.onnx", steering=d)
    assert (base_meta.defaults, meta.defaults, meta.steering_hash) == ("base", "steering", d.hash())
    assert json.loads(sidecar_path(tmp_path / "steer.onnx").read_text())["defaults"] == "steering"
    x = example_inputs(model.config, seed=2)
    feeds = {k: v.numpy() for k, v in x.items()}
    with torch.no_grad():
        steered, base = d.tuned(**x).numpy(), model(**x).numpy()
    assert rel_err(steered, base) > 100 * RTOL                     # the delta matters
    capfd.readouterr()
    for path, want in ((tmp_path / "steer.onnx", steered), (tmp_path / "base.onnx", base)):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == [s.name for s in meta.inputs] == list(feeds)
        assert rel_err(sess.run(None, feeds)[0], want) <= RTOL
    engine = load_engine(tmp_path / "steer.onnx")
    assert capfd.readouterr().err == ""                           # no "Initializer ... appears in graph inputs"
    assert rel_err(engine.run(feeds), steered) <= RTOL
    d2 = steered_delta(model, heads=(HeadRef(1, 2),), seed=4)
    for delta, ref in ((None, model), (d2, d2.tuned), ("exported", d.tuned)):
        engine.set_steering(tmp_path / meta.steering_file if delta == "exported" else delta)
        with torch.no_grad():
            assert rel_err(engine.run(feeds), ref(**x).numpy()) <= RTOL


def test_bad_deltas_are_refused(exported):
    model, path, _ = exported
    engine = load_engine(path)
    other = steered_delta(tiny(seed=9))                        # trained on another base model
    with pytest.raises(DeltaError, match="trained on base model"):
        engine.set_steering(other)
    with pytest.raises(DeltaError, match="does not take as an input"):
        engine.set_steering(steered_delta(model, which="qkvo"))   # k/v are not inputs of this export
    with pytest.raises(DeltaError, match="no steering delta"):
        engine.set_steering("/nonexistent/delta.safetensors")
    with pytest.raises(DeltaError, match="trained on base model"):
        export_onnx(model, path.with_name("never.onnx"), steering=other)
    assert engine.metadata()["steering_hash"] is None           # a refused switch leaves the engine as it was


def test_sidecar_contents(exported):
    model, path, meta = exported
    side = json.loads(sidecar_path(path).read_text())
    assert side["base_fingerprint"] == model.fingerprint()
    assert side["opset"] == 17 and side["precision"] == "fp32"
    assert side["session_options"]["intra_op_num_threads"] == 2
    assert side["session_options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert {i["name"] for i in side["inputs"]} >= {"images", "state", "lang", "lang_mask"}
    assert side["outputs"] == [{"name": "actions", "shape": [1, 4, 7], "dtype": "float32"}]
    assert side["normalisation"]["action_std"] == pytest.approx([0.05] * 7)
    assert len(side["steerable"]) == model.config.n_layers * 3            # q weight, q bias, o weight
    assert EngineMeta.load(path).engine_sha256 == meta.engine_sha256


def test_errors_are_clear(exported, tmp_path):
    model, path, _ = exported
    engine = load_engine(path)
    x = {k: v.numpy() for k, v in example_inputs(model.config).items()}
    with pytest.raises(ValueError, match=r"'images' has shape \(1, 2, 3, 16, 16\)"):
        engine.run({**x, "images": x["images"][..., :16, :16]})
    with pytest.raises(ValueError, match="dtype"):
        engine.run({**x, "state": x["state"].astype(np.float64)})
    with pytest.raises(ValueError, match="lack"):
        engine.run({"images": x["images"]})
    # missing sidecar / corrupted engine / missing base weights / missing files
    bad = tmp_path / "copy.onnx"
    bad.write_bytes(path.read_bytes())
    with pytest.raises(EngineError, match="no metadata sidecar"):
        load_engine(bad)
    for f in (path, sidecar_path(path), path.with_name(path.name + ".base.safetensors")):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    flipped = tmp_path / path.name
    data = bytearray(flipped.read_bytes())
    data[-20] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="checksum"):
        load_engine(flipped)
    with pytest.raises(EngineError, match="no engine at"):
        load_engine(tmp_path / "missing.onnx")
    with pytest.raises(EngineError, match="cannot be served by the tensorrt backend"):
        load_engine(path, backend="tensorrt")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(EngineError, match="cannot tell the backend"):
        load_engine(tmp_path / "weights.bin")


def test_load_engine_selects_backend(exported, tmp_path):
    model, path, _ = exported
    model.save_pretrained(tmp_path / "ckpt")
    assert isinstance(load_engine(tmp_path / "ckpt"), TorchEngine)
    assert isinstance(load_engine(path), OnnxEngine)
    assert isinstance(load_engine(sidecar_path(path)), OnnxEngine)       # the sidecar names its engine
    meta = load_engine(path).metadata()
    assert meta["backend"] == "onnxruntime" and meta["chunk"] == 4 and meta["load_seconds"] < 5


def test_fp16_export_runs(exported, tmp_path):
    model, _, _ = exported
    export_onnx(model, tmp_path / "h.onnx", config=OnnxExportConfig(precision="fp16"))
    engine = load_engine(tmp_path / "h.onnx")
    assert engine.metadata()["precision"] == "fp16"
    x = example_inputs(model.config, seed=4)
    with torch.no_grad():
        ref = model(**x).numpy()
    assert rel_err(engine.run({k: v.numpy() for k, v in x.items()}), ref) < 2e-2


def test_minilm_model_exports_with_language_outside_the_graph(tmp_path):
    model = tiny(seed=4, language="minilm")
    meta = export_onnx(model, tmp_path / "lm.onnx")
    assert meta.input_spec("lang").shape == [1, 8, 384] and meta.language_fingerprint
    proto = onnx.load(str(tmp_path / "lm.onnx"))
    assert len(proto.graph.node) < 400          # MiniLM's own layers are not in the graph
    engine = load_engine(tmp_path / "lm.onnx")
    obs = observation(8)
    assert rel_err(engine.predict(obs, "put the red cube on the blue plate"),
                   model.predict(obs, "put the red cube on the blue plate")) <= RTOL


def test_cli_export(tmp_path):
    from typer.testing import CliRunner

    from edge_steer.cli import app
    model = tiny(seed=5)
    model.save_pretrained(tmp_path / "ckpt")
    d = steered_delta(model)
    d.save(tmp_path / "d.safetensors")
    r = CliRunner().invoke(app, ["export", "--model", str(tmp_path / "ckpt"), "--steering", str(tmp_path / "d.safetensors"),
                                 "--format", "onnx", "--out", str(tmp_path / "e" / "p.onnx")])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert out["fused_attention_nodes"] == 2 and out["steering"] == d.hash()[:12]
    r = CliRunner().invoke(app, ["export", "--model", str(tmp_path / "ckpt"), "--format", "tflite", "--out", "x"])
    assert r.exit_code == 2 and "onnx or trt" in r.output
    other = tiny(seed=11)
    other.save_pretrained(tmp_path / "other")
    r = CliRunner().invoke(app, ["export", "--model", str(tmp_path / "other"), "--steering", str(tmp_path / "d.safetensors"),
                                 "--out", str(tmp_path / "o.onnx")])
    assert r.exit_code == 2 and "trained on base model" in r.output


def test_default_model_exports_loads_and_predicts(tmp_path):
    """The embedded checkpoint when it is installed, else a default-config model (same graph)."""
    from edge_steer.models import DEFAULT_MODEL_DIR, load_model
    if DEFAULT_MODEL_DIR.exists():
        model = load_model()
    else:
        torch.manual_seed(0)
        model = EdgeVLA(EdgeVLAConfig()).eval()
    meta = export_onnx(model, tmp_path / "default.onnx")
    assert meta.fused_attention["nodes"] == model.config.n_layers
    engine = load_engine(tmp_path / "default.onnx")
    obs = observation(9, size=model.config.image_size)
    assert rel_err(engine.predict(obs, "put the red cube on the blue plate"),
                   model.predict(obs, "put the red cube on the blue plate")) <= RTOL


def test_the_daemon_bounds_onnxruntimes_thread_pool_by_engine_threads(exported):
    from edge_steer.runtime.config import ServeConfig
    from edge_steer.runtime.daemon import build_engine

    _, path, _ = exported
    for threads in (1, 2):
        cfg = ServeConfig.sim().with_(engine={"backend": "onnxruntime", "path": str(path), "threads": threads})
        engine = build_engine(cfg, robot=None)
        assert engine.session.get_session_options().intra_op_num_threads == threads
