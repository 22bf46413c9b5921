"""Demo recording into the dataset, open-loop replay, and the CLI around them."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_steer.cli import app
from edge_steer.data import Dataset
from edge_steer.sim.demos import episode_seed, generate_demos, replay_episode
from edge_steer.sim.env import EnvConfig, SimEnv
from edge_steer.sim.tasks import get_task

runner = CliRunner()
SMALL = EnvConfig(image_size=48)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos") / "ds"
    summary = generate_demos("blue_cube_behind_white_bowl", 2, 7, out, SMALL, workers=2)
    return out, summary


def test_generated_demos_form_a_readable_dataset(demos):
    out, summary = demos
    assert summary["saved"] == 2
    ds = Dataset(out)
    assert ds.num_episodes == 2
    for ep in ds.episodes:
        assert ep.success is True
        assert ep.task == "put the blue cube behind the white bowl"
        assert ep.extra["task_name"] == "blue_cube_behind_white_bowl"
    ep0 = ds.episode(0)
    assert ep0["observation.images.front"].shape[1:] == (48, 48, 3)
    assert ep0["action"].shape[1] == 7 and ep0["observation.state"].shape[1] == 8
    # the gripper closes once and opens once per pick-and-place
    g = ep0["action"][:, 6]
    assert g[0] == 0 and g.max() == 1 and np.count_nonzero(np.diff(g) != 0) == 2
    # both episodes come from distinct, reproducible seeds
    assert {ep.extra["seed"] for ep in ds.episodes} == {episode_seed(7, 0, "blue_cube_behind_white_bowl"), episode_seed(7, 1, "blue_cube_behind_white_bowl")}


def test_replay_reproduces_the_demo(demos):
    out, _ = demos
    assert replay_episode(out, 1) is True


def test_replay_of_corrupted_actions_fails(demos, tmp_path):
    """Replay really executes the stored actions: zeroing them must lose the success."""
    import shutil

    import pyarrow.parquet as pq
    copy = tmp_path / "ds"
    shutil.copytree(demos[0], copy)
    for f in (copy / "data").rglob("*.parquet"):
        t = pq.read_table(f)
        zero = [[0.0] * 7] * t.num_rows
        import pyarrow as pa
        t = t.set_column(t.schema.get_field_index("action"), "action",
                         pa.array(zero, type=t.schema.field("action").type))
        pq.write_table(t, f)
    assert replay_episode(copy, 0) is False


def test_cli_tasks_list_json():
    res = runner.invoke(app, ["tasks", "list", "--json"])
    assert res.exit_code == 0, res.output
    tasks = json.loads(res.output)
    assert {t["split"] for t in tasks} == {"base", "heldout"}
    assert all(t["instruction"].startswith("put the ") for t in tasks)


@pytest.mark.parametrize("args,msg", [
    (["demos", "generate", "--task", "red_cube_on_blue_plat", "--out", "x"], "Did you mean"),
    (["tasks", "list", "--split", "weird"], "split must be"),
    (["demos", "replay", "--data", "/nonexistent/ds"], "error"),
])
def test_cli_bad_input_exits_with_a_clear_message(args, msg):
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert msg in res.output


def test_cli_generate_then_replay(tmp_path):
    out = tmp_path / "ds"
    res = runner.invoke(app, ["demos", "generate", "--task", "red_cube_on_blue_plate", "--episodes", "1",
                              "--out", str(out), "--image-size", "48", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "saved 1 episodes" in res.output
    res = runner.invoke(app, ["demos", "replay", "--data", str(out), "--episode", "0"])
    assert res.exit_code == 0 and "success=True" in res.output


@pytest.mark.timeout(120)
def test_parallel_generation_after_rendering_in_this_process(tmp_path):
    """Regression: forked workers hung in the renderer once the parent held an EGL context."""
    from edge_steer.sim.env import SimEnv
    from edge_steer.sim.tasks import get_task

    with SimEnv(get_task("red_cube_on_blue_plate"), 0, SMALL) as env:
        env.observe()
    summary = generate_demos("red_cube_on_blue_plate", 2, 3, tmp_path / "ds", SMALL, workers=2)
    assert summary["saved"] == 2


class _StandStill:
    """A policy that holds the arm where it is (zero deltas, gripper open)."""
    def predict(self, observation, instruction):
        return np.zeros((10, 7), np.float32)


def test_takeover_demos_record_only_the_experts_part_from_where_the_policy_left_the_scene(tmp_path):
    """`--takeover`: the policy drives first, then the expert; the dataset holds the expert's part
    alone, marked with its handover step, with the object's position at the handover as the scene
    target, and it refuses an open-loop replay (its first part is missing)."""
    from edge_steer.sim.demos import Takeover, scene_targets
    out = tmp_path / "ds"
    takeover = Takeover(_StandStill, first=4, last=9)
    summary = generate_demos("red_cube_on_blue_plate", 2, 5, out, SMALL, workers=1, takeover=takeover)
    assert summary["saved"] == 2 and summary["skipped"] == 0
    ds = Dataset(out)
    targets = scene_targets(ds)
    for ep in ds.episodes:
        step = ep.extra["takeover_step"]
        assert step == takeover.step(ep.extra["seed"]) and 4 <= step <= 9
        frames = ds.episode(ep.index)
        # standing still, the arm is where it started: the expert's first frame is at the start pose
        with SimEnv(get_task("red_cube_on_blue_plate"), ep.extra["seed"], SMALL) as env:
            start = env.observe()["observation.state"]
        assert np.allclose(frames["observation.state"][0][:3], start[:3], atol=0.01)
        assert np.allclose(targets[ep.index][:2], [ep.extra["pick_x"], ep.extra["pick_y"]])
        with pytest.raises(ValueError, match="handed over at step"):
            replay_episode(out, ep.index)


class _ReflexFirst(_StandStill):
    """Trips a robot reflex in its first episode (as env.step raises it), then stands still."""
    def __init__(self):
        self.calls = 0

    def predict(self, observation, instruction):
        from edge_steer.sim.panda import ControlException
        self.calls += 1
        if self.calls == 1:
            raise ControlException("Motion aborted by reflex! [cartesian_reflex]")
        return super().predict(observation, instruction)


def test_a_policy_that_trips_a_reflex_before_the_handover_is_not_counted_as_an_expert_failure(tmp_path):
    from edge_steer.sim.demos import Takeover
    summary = generate_demos("red_cube_on_blue_plate", 1, 5, tmp_path / "ds", SMALL, workers=1,
                             takeover=Takeover(_ReflexFirst, first=4, last=9))
    assert summary["saved"] == 1 and summary["policy_faults"] == 1 and summary["failed"] == 0
    assert summary["attempts"] == 2


class _AlwaysReflex(_StandStill):
    def predict(self, observation, instruction):
        from edge_steer.sim.panda import ControlException
        raise ControlException("Motion aborted by reflex! [cartesian_reflex]")


def test_a_run_the_policy_keeps_faulting_says_so_rather_than_blaming_the_expert(tmp_path):
    from edge_steer.sim.demos import Takeover
    with pytest.raises(RuntimeError, match="15 where the policy tripped a reflex first"):
        generate_demos("red_cube_on_blue_plate", 1, 5, tmp_path / "ds", SMALL, workers=1,
                       takeover=Takeover(_AlwaysReflex, first=4, last=9))


@pytest.mark.parametrize("steps", ["9:3", "a:b"])
def test_takeover_refuses_a_bad_step_range(steps, tmp_path):
    from edge_steer.models import DEFAULT_MODEL_DIR
    res = runner.invoke(app, ["demos", "generate", "--task", "red_cube_on_blue_plate", "--out", str(tmp_path / "ds"),
                              "--takeover", str(DEFAULT_MODEL_DIR), "--takeover-steps", steps])
    assert res.exit_code == 2 and "--takeover-steps" in res.output
    assert not (tmp_path / "ds").exists()


def test_takeover_refuses_a_missing_checkpoint(tmp_path):
    res = runner.invoke(app, ["demos", "generate", "--task", "red_cube_on_blue_plate", "--out", str(tmp_path / "ds"),
                              "--takeover", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "nope" in res.output
