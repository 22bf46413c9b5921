"""ONNX export and the onnxruntime engine for an HFVLA (transformers vision tower + transformers
backbone, tiny random configs built offline): one fused attention node per layer of both towers,
parity with torch, the engine serving from the sidecar and the tokenizer copied beside the .onnx (no
checkpoint, no model at serve time), a steered export that computes the steered model alone and
switches back to the base, and the CLI chain pretrain -> identify -> finetune steer -> export --steering."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

transformers = pytest.importorskip("transformers")

from edge_steer.export import EngineError, check_fused, export_onnx  # noqa: E402
from edge_steer.models.heads import HeadRef  # noqa: E402
from edge_steer.models.modeling_hfvla import HFVLA  # noqa: E402
from edge_steer.runtime.engine import OnnxEngine, load_engine  # noqa: E402
from edge_steer.steering.delta import SteeringDelta  # noqa: E402
from test_export import RTOL, STATS, observation, rel_err  # noqa: E402
from steering_fixtures import one_torch_thread  # noqa: E402,F401
from test_hfvla import tiny_hf  # noqa: E402

INSTRUCTION = "put the red cube on the blue plate"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model_of(backbone: str, seed: int = 0) -> HFVLA:
    m = tiny_hf(backbone, seed=seed)
    m.set_stats(STATS)
    return m


def sim_observation():
    from edge_steer.sim.env import EnvConfig, SimEnv
    from edge_steer.sim.tasks import tasks_by_split
    task = tasks_by_split("base")[0]
    with SimEnv(task, 0, EnvConfig()) as env:
        return env.observe(), task.instruction


def delta_of(model: HFVLA, heads=(HeadRef(0, 1), HeadRef(1, 3)), seed: int = 1) -> SteeringDelta:
    """What a steer fine-tune writes: new q rows and o columns for a few backbone heads."""
    tuned = copy.deepcopy(model)
    slices = [s for h in tuned.heads() if h.ref in heads for s in h.slices("qo")]
    g = torch.Generator().manual_seed(seed)
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        for s in slices:
            p, idx = params[s.param], torch.arange(s.start, s.stop)
            p.index_add_(s.dim, idx, 0.5 * torch.randn(p.index_select(s.dim, idx).shape, generator=g))
    d = SteeringDelta.from_model(tuned, slices, model.fingerprint(), {"heads": [str(h) for h in heads]}, "qo")
    d.tuned = tuned
    return d


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-llama"])
def test_hfvla_exports_fused_and_the_engine_matches_torch(backbone, tmp_path):
    model = model_of(backbone)
    meta = export_onnx(model, tmp_path / "policy.onnx")
    proto = onnx.load(str(tmp_path / "policy.onnx"))
    n_backbone, n_vision = model.config.n_layers, model.vision.config.num_hidden_layers
    counts = check_fused(proto, n_backbone + n_vision)          # one per layer of both towers, no Softmax
    assert counts["MultiHeadAttention"] == meta.fused_attention["nodes"] == 4 and counts["Softmax"] == 0
    # steerable: the backbone's q/o (what a delta can touch), none of the vision tower's
    assert meta.steerable and all(s.param.startswith("backbone.") for s in meta.steerable)
    assert meta.model_type == "hf_vla" and meta.preprocessing["tokenizer"] == "policy.onnx.tokenizer"
    assert meta.assets and all((tmp_path / f).is_file() for f in meta.assets)
    # the graph alone (a plain session) on random normalised inputs
    sess = ort.InferenceSession(str(tmp_path / "policy.onnx"), providers=["CPUExecutionProvider"])
    for seed in range(2):
        x = model.example_inputs(seed=seed)
        with torch.no_grad():
            ref = model(**x).numpy()
        assert rel_err(sess.run(None, {k: v.numpy() for k, v in x.items()})[0], ref) <= RTOL
    # the engine on a simulated frame, in robot units, served from a folder holding only the export
    served = tmp_path / "served"
    served.mkdir()
    for f in tmp_path.iterdir():
        if f.name.startswith("policy.onnx"):
            (shutil.copytree if f.is_dir() else shutil.copyfile)(f, served / f.name)
    engine = load_engine(served / "policy.onnx")
    assert isinstance(engine, OnnxEngine) and engine.metadata()["image_size"] == model.config.image_size
    obs, instruction = sim_observation()
    a, b = engine.predict(obs, instruction), model.predict(obs, instruction)
    assert a.shape == (model.config.chunk, model.config.action_dim)
    assert np.abs(a - b).max() <= RTOL
    assert np.abs(engine.predict(observation(1), INSTRUCTION) - model.predict(observation(1), INSTRUCTION)).max() <= RTOL


def test_steered_hfvla_file_alone_computes_the_steered_model_and_switches_back(tmp_path):
    model = model_of("tiny-bert", seed=3)
    d = delta_of(model)
    meta = export_onnx(model, tmp_path / "steer.onnx", steering=d)
    assert (meta.defaults, meta.steering_hash) == ("steering", d.hash())
    x = model.example_inputs(seed=2)
    feeds = {k: v.numpy() for k, v in x.items()}
    with torch.no_grad():
        steered, base = d.tuned(**x).numpy(), model(**x).numpy()
    assert rel_err(steered, base) > 100 * RTOL                      # the delta matters
    sess = ort.InferenceSession(str(tmp_path / "steer.onnx"), providers=["CPUExecutionProvider"])
    assert rel_err(sess.run(None, feeds)[0], steered) <= RTOL      # the file alone is the steered model
    engine = load_engine(tmp_path / "steer.onnx")
    obs = observation(2)
    assert np.abs(engine.predict(obs, INSTRUCTION) - d.tuned.predict(obs, INSTRUCTION)).max() <= RTOL
    d2 = delta_of(model, heads=(HeadRef(1, 0),), seed=4)
    for delta, ref in ((None, model), (d2, d2.tuned), (tmp_path / meta.steering_file, d.tuned)):
        engine.set_steering(delta)
        assert np.abs(engine.predict(obs, INSTRUCTION) - ref.predict(obs, INSTRUCTION)).max() <= RTOL


def test_a_missing_or_changed_tokenizer_is_refused(tmp_path):
    model = model_of("tiny-llama")
    meta = export_onnx(model, tmp_path / "p.onnx")
    name = next(iter(meta.assets))
    (tmp_path / name).write_text("{}")
    with pytest.raises(EngineError, match="does not match the checksum"):
        load_engine(tmp_path / "p.onnx")
    shutil.rmtree(tmp_path / "p.onnx.tokenizer")
    with pytest.raises(EngineError, match="preprocessing needs"):
        load_engine(tmp_path / "p.onnx")


def test_cli_pretrain_finetune_steer_export_steering(tmp_path):
    from typer.testing import CliRunner

    from edge_steer.cli import app
    from edge_steer.models import load_model
    from steering_fixtures import write_demos
    run = CliRunner()

    def ok(*args):
        r = run.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r.output

    demos = write_demos(tmp_path / "demos", episodes_per_task=2, length=10)
    ok("pretrain", "--data", demos, "--out", tmp_path / "run", "--steps", 2, "--batch-size", 4,
       "--eval-episodes", 0, "--backbone", "tiny-bert", "--vision", "tiny-siglip")
    model = tmp_path / "run" / "model"
    ok("identify", "--model", model, "--demos", demos, "--out", tmp_path / "heads.json", "--top-k", 2,
       "--max-frames", 8)
    ok("finetune", "--model", model, "--demos", demos, "--method", "steer", "--heads", tmp_path / "heads.json",
       "--out", tmp_path / "steer", "--steps", 2, "--batch-size", 4)
    delta = tmp_path / "steer" / "steering.safetensors"
    out = ok("export", "--model", model, "--steering", delta, "--format", "onnx", "--out", tmp_path / "e" / "p.onnx")
    doc = json.loads(out[out.index("{"):])
    assert doc["fused_attention_nodes"] == 4 and doc["steering"] == SteeringDelta.load(delta).hash()[:12]
    engine, steered = load_engine(tmp_path / "e" / "p.onnx"), load_model(tmp_path / "steer" / "model")
    obs = observation(3)
    assert np.abs(engine.predict(obs, INSTRUCTION) - steered.predict(obs, INSTRUCTION)).max() <= RTOL


def test_cuda_graph_engine_buffers_serve_an_hfvla_on_cpu():
    """The cuda-graph engine's static buffers and steering switch, eagerly on the CPU (no kernel, no
    capture): the model's own preprocessing (images in [-1, 1]) and the trace's inputs of an HFVLA."""
    from edge_steer.runtime.engine import CudaGraphEngine
    model = model_of("tiny-llama", seed=2)
    d = delta_of(model)
    engine = CudaGraphEngine(model, steering=d, device="cpu", capture=False)
    obs = observation(4)
    assert np.abs(engine.predict(obs, INSTRUCTION) - d.tuned.predict(obs, INSTRUCTION)).max() <= RTOL
    engine.set_steering(None)
    assert np.abs(engine.predict(obs, INSTRUCTION) - model.predict(obs, INSTRUCTION)).max() <= RTOL
