"""`eval --instruction`: a task's scenes with another instruction, scored for the instructed task (where
both its objects are in the scene) as well as the scene's own. An oracle policy that moves objects by
hand stands in for a model, so the bookkeeping is tested against known outcomes in the real sim."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_steer.cli import app
from edge_steer.sim import rollout
from edge_steer.sim.env import EnvConfig, SimEnv
from edge_steer.sim.rollout import EpisodeResult, run_policy_episode
from edge_steer.sim.tasks import TASKS, get_task, instructed_task
from steering_fixtures import tiny_model

SCENE = get_task("red_cube_on_blue_plate")   # one distractor per scene


def _scene_with_distractor(shape_ok=("cube", "cylinder", "sphere")):
    """A seed whose distractor (object 2) is a graspable kind, and that distractor."""
    for seed in range(50):
        spec = SCENE.sample_scene(np.random.default_rng(seed), 96).spec
        if spec.objects[2].entity.shape in shape_ok:
            return seed, spec.objects[2].entity
    raise AssertionError("no scene with a distractor")


def test_an_instruction_resolves_on_the_scene_it_is_given_in():
    seed, other = _scene_with_distractor()
    spec = SCENE.sample_scene(np.random.default_rng(seed), 96).spec
    assert instructed_task(spec, "Put the red cube on the blue plate.") is SCENE       # the scene's own, by registry
    made = instructed_task(spec, f"put the {other.name} to the left of the blue plate")
    assert (made.obj.name, made.relation, made.target.name) == (other.name, "left_of", "blue plate")
    assert made.find_in(spec) == (2, 1) and SCENE.find_in(spec) == (0, 1)
    assert instructed_task(spec, "put the red cube in the blue plate") is None       # 'in' needs a bowl
    assert instructed_task(spec, "stack everything") is None
    assert instructed_task(spec, "put the green cylinder in the yellow bowl") is None  # no yellow bowl here
    assert TASKS["green_cylinder_in_yellow_bowl"].find_in(spec) is None


class _Oracle:
    """Does a chosen task by hand (drops its object onto its target) and then holds still; records
    what it was told."""

    env: SimEnv | None = None

    def __init__(self, do: str):
        self.do, self.told, self.moved = do, [], False

    def predict(self, observation, instruction):
        self.told.append(instruction)
        env = _Oracle.env
        if not self.moved:
            obj, target = instructed_task(env.scene, self.do).find_in(env.scene.spec)
            with env.world.lock:
                w = env.world
                t = w.object_pos(target)
                adr = w.model.jnt_qposadr[w.model.body_jntadr[w.obj_body[obj]]]
                w.data.qpos[adr:adr + 3] = (t[0], t[1], t[2] + 0.05)
                w.data.qvel[:] = 0
            self.moved = True
        return np.zeros((5, 7), np.float32)   # hold the target, gripper open


@pytest.fixture
def recorded_env(monkeypatch):
    class Recorded(SimEnv):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            _Oracle.env = self
    monkeypatch.setattr(rollout, "SimEnv", Recorded)


def test_episode_scores_the_instructed_and_the_scenes_own_task(recorded_env):
    seed, other = _scene_with_distractor()
    told = f"put the {other.name} on the blue plate"
    cfg = EnvConfig(max_steps=25)
    # the policy does what it is told: the instructed task succeeds, the scene's own does not
    oracle = _Oracle(told)
    r = run_policy_episode(oracle, SCENE, seed, cfg, instruction=told)
    assert oracle.told and set(oracle.told) == {told}
    assert r.instructed_success is True and r.success is False and r.steps < 25
    # the policy ignores the instruction and does the scene's own task: counted as such, run to the end
    r = run_policy_episode(_Oracle(SCENE.instruction), SCENE, seed, cfg, instruction=told)
    assert r.instructed_success is False and r.success is True and r.steps == 25
    # an instruction naming a task not doable in this scene: only the scene's own is scored
    r = run_policy_episode(_Oracle(SCENE.instruction), SCENE, seed, cfg,
                           instruction="put the green cylinder in the yellow bowl")
    assert r.instructed_success is None and r.success is True and r.steps < 25


def test_eval_cli_reports_both_in_the_table_and_the_json(tmp_path, monkeypatch):
    tiny_model().save_pretrained(tmp_path / "model")
    outcomes = iter([(True, False), (False, None), (False, True), (True, True)])  # (own, instructed)
    seen = []

    def fake_episode(policy, task, seed, config, execute, keep_frames=False, ensemble=None, instruction=None):
        seen.append(instruction)
        own, told = next(outcomes)
        return EpisodeResult(task.name, seed, own, 10, instructed_success=told)

    monkeypatch.setattr(rollout, "run_policy_episode", fake_episode)
    text = "put the green cylinder in the yellow bowl"
    res = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "model"), "--task", "red_cube_on_blue_plate",
                                   "--episodes", "4", "--workers", "1", "--instruction", text,
                                   "--out", str(tmp_path / "log.json")])
    assert res.exit_code == 0, res.output
    assert seen == [text] * 4
    assert "asks for green cylinder in yellow bowl" in res.output and "2/3 (67" in res.output
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["instruction"] == text
    row = log["summary"][0]
    assert (row["successes"], row["episodes"]) == (2, 4)
    assert (row["instructed_successes"], row["instructed_episodes"]) == (2, 3)
    assert [e["instructed_success"] for e in log["episodes"]] == [False, None, True, True]
    res = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "model"), "--task", "red_cube_on_blue_plate",
                                   "--instruction", "  "])
    assert res.exit_code == 2 and "empty" in res.output
