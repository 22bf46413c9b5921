"""The episode environment's action contract and the scripted expert's success rate."""

import numpy as np
import pytest

from edge_steer.contract import MAX_STEP_TRANSLATION, MAX_TARGET_LEAD
from edge_steer.sim.env import EnvConfig, SimEnv
from edge_steer.sim.expert import Perturbation, run_expert_episode
from edge_steer.sim.tasks import TASKS, get_task


@pytest.mark.parametrize("name", list(TASKS))
def test_expert_solves_every_task(name):
    # Two seeded episodes per task here; tools/bench_expert.py measures the rate on many seeds.
    for seed in (11, 12):
        with SimEnv(TASKS[name], seed) as env:
            assert run_expert_episode(env), f"{name} seed {seed}"


def test_action_is_a_delta_from_the_commanded_target():
    with SimEnv(get_task("red_cube_on_blue_plate"), 0) as env:
        p0 = env.world.tcp_pose()[0]
        for _ in range(5):
            env.step([0.0, 0.02, 0.0, 0, 0, 0, 0])
        for _ in range(5):
            env.step([0, 0, 0, 0, 0, 0, 0])  # hold: the arm settles on the target
        moved = env.world.tcp_pose()[0] - p0
        assert moved[1] == pytest.approx(0.10, abs=0.015)
        assert abs(moved[0]) < 0.01 and abs(moved[2]) < 0.01


def test_oversized_steps_are_clipped_not_executed():
    with SimEnv(get_task("red_cube_on_blue_plate"), 0) as env:
        p0 = env.world.tcp_pose()[0]
        env.step([0.0, 0.0, 1.0, 0, 0, 0, 0])  # a 1 m jump request
        env.step([0, 0, 0, 0, 0, 0, 0])
        assert env.world.tcp_pose()[0][2] - p0[2] < MAX_STEP_TRANSLATION + 0.01


def test_target_cannot_run_away_from_a_blocked_arm():
    with SimEnv(get_task("red_cube_on_blue_plate"), 0) as env:
        for _ in range(15):  # drive down into the table
            env.step([0.0, 0.0, -0.05, 0, 0, 0, 0])
        target, _ = env.target
        assert np.linalg.norm(target - env.world.tcp_pose()[0]) <= MAX_TARGET_LEAD + 1e-9


@pytest.mark.parametrize("bad", [np.zeros(6), np.full(7, np.nan), [0, 0, np.inf, 0, 0, 0, 0]])
def test_bad_actions_raise_and_move_nothing(bad):
    with SimEnv(get_task("red_cube_on_blue_plate"), 0) as env:
        q0 = env.world.q
        with pytest.raises(ValueError):
            env.step(bad)
        assert np.array_equal(env.world.q, q0)


def test_same_seed_same_actions_same_outcome():
    acts = np.random.default_rng(0).uniform(-0.02, 0.02, (8, 7))
    acts[:, 6] = 0
    finals = []
    for _ in range(2):
        with SimEnv(get_task("blue_cube_in_white_bowl"), 5) as env:
            for a in acts:
                env.step(a)
            finals.append(env.world.data.qpos.copy())
    assert np.array_equal(finals[0], finals[1])


def test_observation_layout():
    with SimEnv(get_task("red_cube_on_blue_plate"), 0, EnvConfig(image_size=64)) as env:
        obs = env.observe()
    assert obs["observation.images.front"].shape == (64, 64, 3)
    assert obs["observation.images.wrist"].dtype == np.uint8
    state = obs["observation.state"]
    assert state.shape == (8,) and state.dtype == np.float32
    assert np.linalg.norm(state[3:7]) == pytest.approx(1.0, abs=1e-5) and state[3] >= 0
    assert obs["observation.joints"].shape == (7,)


def test_noisy_execution_records_clean_corrective_actions():
    from edge_steer.sim.demos import record_episode
    clean = record_episode("red_cube_on_blue_plate", 3)
    noisy = record_episode("red_cube_on_blue_plate", 3, perturb=Perturbation(action_noise=0.006))
    assert clean.success and noisy.success
    a_clean = np.stack([f["action"] for f in clean.frames])
    a_noisy = np.stack([f["action"] for f in noisy.frames])
    n = min(len(a_clean), len(a_noisy))
    # the recorded labels differ (they correct the injected drift) but stay expert-sized
    assert np.abs(a_noisy[:n, :3] - a_clean[:n, :3]).max() > 0.003
    assert np.abs(a_noisy[:, :3]).max() < 0.06


def test_expert_labels_depend_on_where_the_arm_is_not_on_time():
    """The same arm state gets the same label whenever the expert meets it, and an arm off the path
    is led back to the waypoint (the property behaviour cloning relies on)."""
    from edge_steer.sim.expert import ScriptedExpert
    with SimEnv(get_task("red_cube_on_blue_plate"), 6) as env:
        p, r = env.target
        a = ScriptedExpert(env)
        first = a.act(p, r, p, 0.08)
        for _ in range(5):
            again = a.act(p, r, p, 0.08)
        np.testing.assert_array_equal(first, again)
        pre_grasp = a.waypoints[0].pos
        for off in ([0.1, 0, 0], [0, -0.1, 0], [0, 0.1, 0.05]):
            q = pre_grasp + off
            act = ScriptedExpert(env).act(q, r, q, 0.08)
            assert np.dot(act[:3], -np.asarray(off)) > 0.9 * np.linalg.norm(act[:3]) * np.linalg.norm(off)


@pytest.fixture(scope="module")
def clean_episode():
    """One clean expert episode (seed 4) that the shove and wrist-camera tests compare against."""
    from edge_steer.sim.demos import record_episode
    return record_episode("red_cube_on_blue_plate", 4)


def _first_close(ep) -> int:
    """Index of the frame whose recorded action first closes the gripper."""
    return int(np.flatnonzero(np.stack([f["action"][6] for f in ep.frames]) > 0.5)[0])


def _sideways_labels_below(ep, height: float):
    """The recorded x/y labels of the frames less than `height` m above the grasp, before the gripper
    first closes, and the TCP's x/y where it closes."""
    close = _first_close(ep)
    z = np.stack([f["observation.state"][2] for f in ep.frames])
    rows = [i for i in range(close) if z[i] < z[close] + height]
    return np.stack([ep.frames[i]["action"][:2] for i in rows]), ep.frames[close]["observation.state"][:2]


def test_a_shove_before_the_grasp_is_unrecorded_and_the_expert_leads_back_to_the_object(clean_episode):
    from edge_steer.sim.demos import record_episode
    clean = clean_episode
    pushed = record_episode("red_cube_on_blue_plate", 4, perturb=Perturbation(push=0.08))
    assert clean.success and pushed.success

    def states(ep):
        return np.stack([f["observation.state"][:3] for f in ep.frames])

    def grasp_at(ep):
        return states(ep)[_first_close(ep)]
    off_path = np.linalg.norm(states(pushed)[:, None] - states(clean)[None], axis=2).min(1)
    assert off_path.max() > 0.03          # the recorded states leave the clean path ...
    # no recorded action is the shove itself: every sideways label stays expert-sized
    assert np.abs(np.stack([f["action"][:2] for f in pushed.frames])).max() < 0.06
    np.testing.assert_allclose(grasp_at(pushed)[:2], grasp_at(clean)[:2], atol=0.01)   # ... and still grasp there


def test_a_shove_above_the_object_leaves_sideways_corrections_in_the_descent(clean_episode):
    """approach_push: the arm is shoved once it is above the object, so the recorded descent (which a
    clean expert makes straight down) holds sideways labels back to the object, and the grasp is
    still where the clean expert grasps."""
    from edge_steer.sim.demos import record_episode

    def descent(ep):   # below the pre-grasp height
        return _sideways_labels_below(ep, 0.11)

    clean = clean_episode   # seed 4: 3 of 4 episodes are shoved; this one is (seed 5 is not)
    shoved = record_episode("red_cube_on_blue_plate", 4, perturb=Perturbation(approach_push=0.03))
    assert clean.success and shoved.success
    (clean_xy, clean_at), (shoved_xy, shoved_at) = descent(clean), descent(shoved)
    assert np.abs(clean_xy).sum(1).max() < 0.004      # straight down
    assert np.abs(shoved_xy).sum(0).max() > 0.008     # sideways back toward the object
    np.testing.assert_allclose(shoved_at, clean_at, atol=0.008)


def test_a_shove_low_in_the_descent_leaves_sideways_labels_within_5_cm_of_the_grasp(clean_episode):
    """descent_push: every episode is shoved once the commanded TCP is 5 cm above the grasp, so labels
    that correct sideways exist where a finger is about to land on the object, and the grasp is still
    where the clean expert grasps."""
    from edge_steer.sim.demos import record_episode

    def low_xy(ep):   # within 5 cm above the grasp
        return _sideways_labels_below(ep, 0.05)

    clean_xy, clean_at = low_xy(clean_episode)
    assert np.abs(clean_xy).sum(1).max() < 0.004   # the clean descent goes straight down there
    for seed in (4, 5):   # unlike approach_push, no episode is left unshoved
        shoved = record_episode("red_cube_on_blue_plate", seed, perturb=Perturbation(descent_push=0.02))
        assert shoved.success
        xy, at = low_xy(shoved)
        assert np.abs(xy).sum(0).max() > 0.004, f"seed {seed}: no sideways correction near the object"
        if seed == 4:
            np.testing.assert_allclose(at, clean_at, atol=0.008)


def test_a_missed_grasp_is_recovered_and_only_the_recovery_is_recorded():
    """miss: the first grasp is aimed beside the object and not recorded; the expert finds its fingers
    closed on nothing, opens, backs up, re-centres and grasps. The recorded demo starts at the
    empty, closed gripper with an "open" label, and its second grasp holds the object (which the
    first attempt may have nudged: the expert reads the scene again)."""
    from edge_steer.sim.demos import record_episode
    ep = record_episode("red_cube_on_blue_plate", 4, perturb=Perturbation(miss=0.04, miss_share=1.0))
    assert ep.success
    first = ep.frames[0]
    width = [f["observation.state"][7] for f in ep.frames]
    assert width[0] < 0.035 and first["action"][6] < 0.5      # closed on nothing, told to open
    close = _first_close(ep)
    assert max(width[:close]) > 0.07                            # it opened before the new grasp
    z = np.stack([f["observation.state"][2] for f in ep.frames])
    assert z[:close].max() > z[close] + 0.1                     # and backed up above the object
    assert min(width[close + 8:close + 20]) > 0.03              # the fingers stop on the cube: held


def test_the_expert_starts_over_only_when_its_fingers_close_on_nothing():
    from edge_steer.sim.expert import ScriptedExpert
    with SimEnv(get_task("red_cube_on_blue_plate"), 3) as env:
        expert = ScriptedExpert(env)
        grasp = expert.waypoints[1]
        expert.phase = 3                                       # lifting after the close ...
        p = grasp.pos.copy()
        expert.act(p, grasp.rot, p, expert.width - 0.002)      # ... holding the object: go on
        assert expert.retries == 0 and expert.phase == 3
        a = expert.act(p, grasp.rot, p, 0.0)                   # ... fingers shut on nothing
        assert expert.retries == 1 and a[6] == 0.0             # start over: open first
        assert np.allclose(expert.waypoints[1].pos, grasp.pos + [0, 0, 0.12])   # then up above the object


def test_perturbations_refuse_negative_sizes_and_shares_outside_0_1():
    with pytest.raises(ValueError, match="descent_push"):
        Perturbation(descent_push=-0.01)
    with pytest.raises(ValueError, match="approach_share"):
        Perturbation(approach_share=1.5)
    with pytest.raises(ValueError, match="miss_share"):
        Perturbation(miss=0.04, miss_share=-0.1)


def test_the_wrist_camera_sees_the_object_between_the_fingers_at_the_grasp(clean_episode):
    """The wrist camera looks down the gripper at the fingertips, so the last centimetres of a grasp
    are visible: at the pre-grasp and when the gripper closes, the red cube is well inside the wrist
    image, horizontally centred (the fingers open along the image's x)."""
    ep = clean_episode
    close = _first_close(ep)
    z = np.stack([f["observation.state"][2] for f in ep.frames])
    above = int(np.flatnonzero(z[:close] < z[close] + 0.125)[0])    # first frame near the pre-grasp
    for i in (above, close):
        img = ep.frames[i]["observation.images.wrist"].astype(int)
        r, g, b = img[..., 0], img[..., 1], img[..., 2]
        red = (r > 70) & (r > 2 * g) & (r > 2 * b)
        assert red.sum() > 40, f"frame {i}: the cube is not in the wrist view ({red.sum()} red pixels)"
        rows, cols = np.nonzero(red)
        w = img.shape[1]
        assert abs(cols.mean() - w / 2) < w / 6
        assert 0.1 * w < rows.mean() < 0.9 * w


def _drive_expert_until(env, phase: int) -> None:
    """The clean expert drives `env` until it reaches waypoint `phase`, then is dropped: a stand-in for
    a policy that got the episode that far."""
    from edge_steer.sim.expert import ScriptedExpert
    expert = ScriptedExpert(env)
    while expert.phase < phase:
        env.step(expert.act_env(env))
        assert env.steps < 120, "the expert never got there"


@pytest.mark.parametrize("phase, resumed, grip", [
    (0, 0, 0.0),     # nothing done yet: start from above the object
    (2, 1, 1.0),     # at the grasp, fingers open: inside the cone (descend), already down, so close
    (4, 3, 1.0),     # carrying the object: keep it closed, go on to the goal
])
def test_an_expert_taking_over_reads_its_phase_from_the_scene_and_finishes(phase, resumed, grip):
    """`ScriptedExpert.resume` (the handover of `demos generate --takeover`) knows nothing of how the
    episode got where it is: the phase comes from the arm, the gripper and the object alone, and
    from every such state the resumed expert completes the task."""
    from edge_steer.sim.expert import ScriptedExpert
    with SimEnv(get_task("red_cube_on_blue_plate"), 5) as env:
        _drive_expert_until(env, phase)
        expert = ScriptedExpert.resume(env)
        assert expert.phase == resumed
        labels = []
        assert run_expert_episode(env, lambda obs, a: labels.append(a), expert=expert)
        assert labels[0][6] == grip


def test_an_expert_taking_over_a_gripper_shut_on_nothing_opens_it_and_starts_over():
    from edge_steer.sim.expert import ScriptedExpert
    with SimEnv(get_task("red_cube_on_blue_plate"), 5) as env:
        for _ in range(8):                        # close in mid-air, where the start pose is
            env.step(np.array([0, 0, 0, 0, 0, 0, 1.0]))
        assert env.gripper_closed and env.world.gripper_width < 0.01
        expert = ScriptedExpert.resume(env)
        assert expert.phase == 0
        labels = []
        assert run_expert_episode(env, lambda obs, a: labels.append(a), expert=expert)
        assert labels[0][6] == 0.0


def test_an_expert_taking_over_a_cube_gripped_off_its_faces_carries_it_on(monkeypatch):
    """A policy that does not turn the hand grips a cube across its corners: the fingers stand wider
    than the cube's side, yet it holds. The expert taking over must carry it on, not open the gripper
    (which taught the policy to let go of such grasps)."""
    import edge_steer.sim.expert as expert_mod
    with SimEnv(get_task("red_cube_on_blue_plate"), 8) as env:   # the cube stands 44 degrees off square
        with monkeypatch.context() as m:
            m.setattr(expert_mod, "_grasp_yaw", lambda env: 0.0)   # a hand that never turns
            _drive_expert_until(env, 4)
        width = env.world.gripper_width
        assert width > expert_mod.grasp_width(env) + 0.006, "not gripped off its faces: the test shows nothing"
        expert = expert_mod.ScriptedExpert.resume(env)
        assert expert.phase == 3
        labels = []
        assert run_expert_episode(env, lambda obs, a: labels.append(a), expert=expert)
        assert labels[0][6] == 1.0
