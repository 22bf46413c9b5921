"""`edge-steer pretrain` and `edge-steer eval` end to end on a tiny run."""

import json

import numpy as np

import pytest
from typer.testing import CliRunner

from edge_steer.cli import app
from edge_steer.sim.demos import generate_demos
from edge_steer.sim.env import EnvConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    generate_demos("red_cube_on_blue_plate", 2, 0, root / "data", EnvConfig(image_size=48), workers=1)
    res = runner.invoke(app, ["pretrain", "--data", str(root / "data"), "--out", str(root / "run"),
                              "--steps", "6", "--batch-size", "4", "--eval-episodes", "0"])
    assert res.exit_code == 0, res.output
    return root


def test_pretrain_writes_a_loadable_model_and_checkpoints(run_dir):
    from edge_steer.models import EdgeVLA
    model = EdgeVLA.from_pretrained(run_dir / "run" / "model")
    assert model.config.language == "minilm"
    assert list((run_dir / "run" / "checkpoints").glob("step_*.pt"))
    # normalisation stats came from the dataset, not the defaults
    assert float(model.action_std[-1]) != 1.0


def test_pretrain_resumes_from_its_checkpoint(run_dir):
    res = runner.invoke(app, ["pretrain", "--data", str(run_dir / "data"), "--out", str(run_dir / "run"),
                              "--steps", "8", "--batch-size", "4", "--eval-episodes", "0"])
    assert res.exit_code == 0, res.output
    hist = json.loads((run_dir / "run" / "history.json").read_text())
    assert hist[-1]["step"] == 8


def test_eval_reports_success_with_interval_log_and_gif(run_dir, tmp_path):
    out, gif = tmp_path / "eval.json", tmp_path / "ep.gif"
    res = runner.invoke(app, ["eval", "--model", str(run_dir / "run" / "model"), "--task", "red_cube_on_blue_plate",
                              "--episodes", "1", "--workers", "1", "--out", str(out), "--gif", str(gif)])
    assert res.exit_code == 0, res.output
    log = json.loads(out.read_text())
    assert len(log["episodes"]) == 1 and log["summary"][0]["episodes"] == 1
    lo, hi = log["summary"][0]["ci95"]
    assert 0.0 <= lo < hi <= 1.0
    assert gif.stat().st_size > 1000


def test_eval_refuses_a_bad_model_dir(tmp_path):
    res = runner.invoke(app, ["eval", "--model", str(tmp_path), "--task", "red_cube_on_blue_plate"])
    assert res.exit_code == 2 and "not an edge-steer checkpoint" in res.output


def test_scene_targets_are_where_the_sim_put_the_objects(run_dir):
    import numpy as np

    from edge_steer.data import Dataset
    from edge_steer.sim.demos import scene_targets
    from edge_steer.sim.env import SimEnv
    from edge_steer.sim.tasks import get_task
    ds = Dataset(run_dir / "data")
    targets = scene_targets(ds)
    assert sorted(targets) == [e.index for e in ds.episodes]
    for ep in ds.episodes:
        with SimEnv(get_task(ep.extra["task_name"]), int(ep.extra["seed"]), EnvConfig(image_size=48)) as env:
            np.testing.assert_allclose(targets[ep.index][:2], env.world.object_pos(0)[:2], atol=2e-3)
            np.testing.assert_allclose(targets[ep.index][2:4], env.scene.goal_xy, atol=1e-6)
        actions = ds.episode(ep.index)["action"]
        assert targets[ep.index][4] == np.flatnonzero(actions[:, 6] > 0.5)[0]


def test_pretrain_with_keypoints_state_dropout_and_scene_loss(run_dir, tmp_path):
    from edge_steer.models import EdgeVLA
    res = runner.invoke(app, ["pretrain", "--data", str(run_dir / "data"), "--out", str(tmp_path / "run"),
                              "--steps", "3", "--batch-size", "4", "--eval-episodes", "0", "--keypoints", "4",
                              "--state-dropout", "0.5", "--scene-aux", "0.5", "--augment-shift", "1",
                              "--d-model", "48", "--n-layers", "2", "--n-heads", "6", "--head-dim", "8"])
    assert res.exit_code == 0, res.output
    m = EdgeVLA.from_pretrained(tmp_path / "run" / "model")
    c = m.config
    assert (c.keypoints, c.state_dropout, c.scene_aux, c.augment_shift) == (4, 0.5, 0.5, 1)
    assert (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (48, 2, 6, 6, 8)
    assert len(m.heads()) == 12 and hasattr(m, "scene_out") and hasattr(m, "keypoint_maps")


def test_pretrain_grows_an_init_checkpoint_deeper_and_refuses_to_widen_it(run_dir, tmp_path):
    from edge_steer.models import EdgeVLA
    res = runner.invoke(app, ["pretrain", "--data", str(run_dir / "data"), "--out", str(tmp_path / "deep"),
                              "--init", str(run_dir / "run" / "model"), "--n-layers", "5", "--n-heads", "10",
                              "--steps", "1", "--batch-size", "4", "--eval-episodes", "0"])
    assert res.exit_code == 0, res.output
    c = EdgeVLA.from_pretrained(tmp_path / "deep" / "model").config
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.d_model) == (5, 10, 10, 128)
    res = runner.invoke(app, ["pretrain", "--data", str(run_dir / "data"), "--out", str(tmp_path / "wide"),
                              "--init", str(run_dir / "run" / "model"), "--d-model", "192", "--steps", "1"])
    assert res.exit_code != 0 and "fixes the trunk's width; --d-model can only start a model from scratch" in res.output
    assert not (tmp_path / "wide").exists()
    res = runner.invoke(app, ["pretrain", "--data", str(run_dir / "data"), "--out", str(tmp_path / "less"),
                              "--init", str(run_dir / "run" / "model"), "--n-layers", "2", "--steps", "1"])
    assert res.exit_code != 0 and "can only grow" in res.output


class _FakeEnv:
    """Records the actions a rollout executes; never succeeds."""
    def __init__(self, task, seed, config):
        self.task, self.steps, self.actions = task, 0, []

    def __enter__(self):
        _FakeEnv.last = self
        return self

    def __exit__(self, *exc):
        return False

    def observe(self):
        return {}

    def step(self, action):
        self.actions.append(float(action[0]))
        self.steps += 1

    def success(self):
        return False


class _CountingPolicy:
    """Chunk n (the n-th call) holds the value n in every entry."""
    def __init__(self, chunk=4):
        self.calls, self.chunk = 0, chunk

    def predict(self, observation, instruction):
        out = np.full((self.chunk, 7), float(self.calls), np.float32)
        self.calls += 1
        return out


def test_rollout_executes_chunks_or_their_temporal_ensemble(monkeypatch):
    from edge_steer.contract import ensemble_actions
    from edge_steer.sim import rollout
    from edge_steer.sim.tasks import get_task
    monkeypatch.setattr(rollout, "SimEnv", _FakeEnv)
    task = get_task("red_cube_on_blue_plate")
    rollout.run_policy_episode(_CountingPolicy(), task, 0, execute=2, max_steps=6)
    assert _FakeEnv.last.actions == [0, 0, 1, 1, 2, 2]             # plain: 2 actions of each chunk
    rollout.run_policy_episode(_CountingPolicy(), task, 0, execute=1, max_steps=6, ensemble=0.0)
    # step s averages the chunks made at steps s-3..s that still cover it (chunk length 4)
    assert _FakeEnv.last.actions == pytest.approx([np.mean(range(max(0, s - 3), s + 1)) for s in range(6)])
    np.testing.assert_allclose(ensemble_actions([np.zeros(7), np.ones(7)], 50.0), np.zeros(7), atol=1e-12)
