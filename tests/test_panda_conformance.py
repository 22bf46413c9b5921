"""SimPanda against the installed panda-py (1.1.1), by introspection and by calling both side by side:
the constructor, move_to_pose's four overloads, move_to_joint_position's two, is_moving's meaning, the
calls a user script makes, and the value types (RobotState's lists, Duration, RobotMode, Errors). Only
what needs a live FCI connection (panda_py.Panda itself) is not called. The TCP pose is checked against
panda_py.fk: our flange matches it to 1e-9, and our end effector is libfranka's F_T_EE for the hand
(0.1034 m), 0.4 mm past panda_py.fk's closed form (0.103 m) along the tool axis (docs/sim.md)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

panda_py = pytest.importorskip("panda_py")
from panda_py import libfranka  # noqa: E402

import edge_steer.sim  # noqa: E402,F401  (MUJOCO_GL before mujoco)
from edge_steer.franka.arm import F_T_EE, PANDA_PY_FK_TCP_D, Q_MAX, Q_MIN, Q_START, fk, hand_transform  # noqa: E402
from edge_steer.franka.types import (ERROR_FLAGS, Duration, Errors, GripperState, RealtimeConfig, RobotMode,  # noqa: E402
                                     RobotState, error_list)
from edge_steer.sim.panda import SimGripper, SimPanda  # noqa: E402

CONFIGS = [Q_START] + [Q_START + np.random.default_rng(i).uniform(-0.6, 0.6, 7) for i in range(5)]


@pytest.fixture
def arm():
    robots = []

    def make(**kw):
        robots.append(SimPanda("10.0.0.2", realtime=False, **kw))
        return robots[-1]
    yield make
    for r in robots:
        r.close()


# ---- kinematics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("q", CONFIGS, ids=[f"q{i}" for i in range(len(CONFIGS))])
def test_tcp_is_libfrankas_hand_frame_on_panda_py_fks_flange(q):
    q = np.clip(q, Q_MIN, Q_MAX)
    theirs = panda_py.fk(q)
    flange = theirs @ np.linalg.inv(hand_transform(PANDA_PY_FK_TCP_D))
    np.testing.assert_allclose(fk(q, tcp=False), flange, atol=1e-9)          # the arm is the same
    np.testing.assert_allclose(fk(q), flange @ F_T_EE, atol=1e-9)            # the EE is Desk's F_T_EE
    gap = np.linalg.inv(theirs) @ fk(q)                                      # ... 0.4 mm down the tool axis
    np.testing.assert_allclose(gap, hand_transform(0.1034 - PANDA_PY_FK_TCP_D) @ np.linalg.inv(
        hand_transform(0.0)), atol=1e-9)


def test_the_twin_reports_that_tcp_and_its_f_t_ee(arm):
    a = arm()
    st = a.get_state()
    np.testing.assert_allclose(np.reshape(st.O_T_EE, (4, 4), order="F"), fk(np.asarray(st.q)), atol=1e-9)
    np.testing.assert_allclose(np.reshape(st.F_T_EE, (4, 4), order="F"), F_T_EE)
    np.testing.assert_allclose(a.get_pose(), fk(a.q), atol=1e-9)


# ---- signatures ------------------------------------------------------------------------------------
def _params(doc: str, name: str) -> list[list[str]]:
    import re
    out = []
    for m in re.finditer(rf"^\s*(?:\d+\.\s+)?{name}\((.*)\)\s*->", doc, re.M):
        names = [p.split(":")[0].strip() for p in re.split(r",\s(?=\w+:)", m.group(1))]
        out.append([n for n in names if n != "self"])
    return out


def test_constructor_matches_panda_py():
    (theirs,) = _params(panda_py.Panda.__init__.__doc__, "__init__")
    ours = [p for p in inspect.signature(SimPanda.__init__).parameters.values()
            if p.kind == p.POSITIONAL_OR_KEYWORD and p.name != "self"]
    assert [p.name for p in ours] == theirs == ["hostname", "name", "realtime_config"]
    assert ours[1].default == "panda" and ours[2].default == RealtimeConfig.kIgnore
    assert {m.name: m.value for m in RealtimeConfig} == {n: v.value for n, v in libfranka.RealtimeConfig.__members__.items()}
    (gripper,) = _params(libfranka.Gripper.__init__.__doc__, "__init__")
    assert gripper == list(inspect.signature(SimGripper.__init__).parameters)[1:] == ["franka_address"]


@pytest.mark.parametrize("member", ["teaching_mode", "get_model", "get_robot", "refresh_state", "enable_logging",
                                    "disable_logging", "get_log", "set_default_behavior", "is_moving",
                                    "get_joint_limits_lower", "get_joint_limits_upper"])
def test_panda_methods_exist_with_panda_pys_parameters(member):
    (theirs,) = _params(getattr(panda_py.Panda, member).__doc__, member)
    ours = [n for n in inspect.signature(getattr(SimPanda, member)).parameters if n != "self"]
    assert ours == theirs


def test_gripper_members_match():
    for member in ("grasp", "move", "homing", "stop", "read_once", "server_version"):
        (theirs,) = _params(getattr(libfranka.Gripper, member).__doc__, member)
        assert [n for n in inspect.signature(getattr(SimGripper, member)).parameters if n != "self"] == theirs


# ---- value types -----------------------------------------------------------------------------------
def test_value_types_mirror_libfranka():
    assert {m.name: m.value for m in RobotMode} == {n: v.value for n, v in libfranka.RobotMode.__members__.items()}
    assert set(ERROR_FLAGS) == {n for n in dir(libfranka.Errors) if not n.startswith("_")}
    assert str(Errors()) == str(libfranka.Errors()) == "[]" and not Errors() and not libfranka.Errors()
    e = Errors(["joint_reflex", "cartesian_reflex"])
    assert e and e.joint_reflex is True and e.power_limit_violation is False and str(e) == "[joint_reflex, cartesian_reflex]"
    with pytest.raises(AttributeError):
        e.joint_reflex = False                      # read-only, as libfranka's
    assert error_list(libfranka.Errors()) == [] and error_list(e) == ["joint_reflex", "cartesian_reflex"]
    for ours, theirs in ((Duration(1500), libfranka.Duration(1500)),):
        assert ours.to_sec() == theirs.to_sec() and ours.to_msec() == theirs.to_msec()
    fields = {n for n in dir(libfranka.RobotState) if not n.startswith("_")}
    assert set(RobotState.__dataclass_fields__) <= fields
    assert set(GripperState.__dataclass_fields__) == {n for n in dir(libfranka.GripperState) if not n.startswith("_")}


def test_robot_state_fields_have_libfrankas_types(arm):
    st = arm().get_state()
    assert all(type(getattr(st, f)) is list for f in ("q", "dq", "tau_J", "O_T_EE", "F_T_EE"))
    assert len(st.q) == 7 and len(st.O_T_EE) == 16
    assert isinstance(st.time, Duration) and isinstance(st.robot_mode, RobotMode) and isinstance(st.current_errors, Errors)
    assert st.robot_mode == RobotMode.kIdle and not st.current_errors


# ---- calls ----------------------------------------------------------------------------------------
def _close(a, pose, tol=0.01):
    return np.linalg.norm(a.get_pose()[:3, 3] - pose[:3, 3]) < tol


def test_move_to_pose_answers_all_four_overloads(arm):
    a = arm()
    start = a.get_pose()
    goal = start.copy()
    goal[:3, 3] += [0.03, -0.02, -0.03]
    quat = a.get_orientation()
    assert a.move_to_pose(goal[:3, 3], quat) and _close(a, goal)                        # position, orientation
    assert a.move_to_pose(start) and _close(a, start)                                   # one 4x4
    assert a.move_to_pose(pose=[goal, start]) and _close(a, start)                      # list of 4x4
    assert a.move_to_pose(positions=[goal[:3, 3], start[:3, 3]], orientations=[quat, quat], speed_factor=0.3)
    assert _close(a, start)
    with pytest.raises(TypeError):
        a.move_to_pose(positions=[goal[:3, 3]], pose=goal)
    with pytest.raises(TypeError):
        a.move_to_pose(goal, 0.2, bogus=1)
    with pytest.raises(ValueError):
        a.move_to_pose(np.eye(3))
    assert not a.is_moving()


def test_move_to_joint_position_takes_waypoints(arm):
    a = arm()
    q1 = Q_START + np.array([0.2, 0.0, 0.0, 0.0, 0.0, 0.0, -0.2])
    assert a.move_to_joint_position(waypoints=[q1, Q_START], speed_factor=0.4)
    np.testing.assert_allclose(a.q, Q_START, atol=0.01)
    assert a.move_to_joint_position(positions=q1) and np.allclose(a.q, q1, atol=0.01)
    with pytest.raises(TypeError):
        a.move_to_joint_position(q1, waypoints=[q1])


def test_is_moving_means_a_controller_runs_and_teaching_mode_is_one(arm):
    from edge_steer.sim.panda import CartesianImpedance
    a = arm()
    assert not a.is_moving()
    a.start_controller(CartesianImpedance())
    assert a.is_moving()                      # holding still under a controller still counts, as in panda-py
    a.stop_controller()
    a.teaching_mode(True)
    assert a.is_moving()
    a.teaching_mode(False)
    assert not a.is_moving()


def test_logging_model_robot_and_gripper(arm):
    a = arm()
    assert a.get_log()["q"] == []
    a.enable_logging(50)
    a.step_until(a.world.time + 0.1)
    log = a.get_log()
    assert len(log["q"]) == 50 and log["O_T_EE"][-1].shape == (16,) and log["time"][-1][0] > log["time"][0][0]
    a.disable_logging()
    a.refresh_state()
    a.set_default_behavior()
    st = a.get_state()
    model = a.get_model()
    np.testing.assert_allclose(model.pose(libfranka.Frame.kEndEffector, st), st.O_T_EE, atol=1e-9)
    jac = model.zero_jacobian(libfranka.Frame.kEndEffector, st).reshape(6, 7, order="F")
    dq = np.full(7, 1e-6)
    moved = fk(np.asarray(st.q) + dq)[:3, 3] - fk(np.asarray(st.q))[:3, 3]
    np.testing.assert_allclose(jac[:3] @ dq, moved, atol=1e-10)
    assert a.get_robot().read_once().q == st.q and isinstance(a.get_robot().server_version(), int)
    g = SimGripper("10.0.0.2")                 # built from the address, as libfranka's
    assert isinstance(g.server_version(), int) and isinstance(g.read_once().time, Duration)
    with pytest.raises(Exception, match="no robot answers"):
        SimGripper("192.0.2.99")


def test_overload_resolution_follows_pybinds():
    from edge_steer.sim.panda import _JOINT_MOVE_OPTIONS, _POSE_MOVE_OPTIONS, _overload
    p, q, t = np.zeros(3), np.array([1.0, 0, 0, 0]), np.eye(4)
    assert len(_overload("move_to_pose", (p, q), {}, _POSE_MOVE_OPTIONS)[0]) == 2
    assert len(_overload("move_to_pose", (p,), {"orientation": q}, _POSE_MOVE_OPTIONS)[0]) == 2
    (pose,), opts = _overload("move_to_pose", (t, 0.5), {"damping_ratio": 0.7}, _POSE_MOVE_OPTIONS)
    assert pose is t and opts["speed_factor"] == 0.5 and opts["damping_ratio"] == 0.7 and opts["nullspace_stiffness"] == 15.0
    with pytest.raises(TypeError, match="given twice"):
        _overload("move_to_pose", (t, 0.5), {"speed_factor": 0.3}, _POSE_MOVE_OPTIONS)
    with pytest.raises(TypeError, match="incompatible"):
        _overload("move_to_pose", (), {"position": p, "pose": t}, _POSE_MOVE_OPTIONS)
    with pytest.raises(TypeError, match="missing target"):
        _overload("move_to_pose", (), {"orientations": [q]}, _POSE_MOVE_OPTIONS)
    (wps,), _ = _overload("move_to_joint_position", (), {"waypoints": [Q_START]}, _JOINT_MOVE_OPTIONS)
    assert wps == [Q_START] or np.array_equal(wps, [Q_START])
