"""SimPanda: Panda kinematics vs libfranka, one control script against the sim, panda-py conformance,
bad input and faults, and the gripper on a real grasp."""

from __future__ import annotations

import ast
import inspect
import json
import re
import threading
import time
from pathlib import Path

import edge_steer.sim  # noqa: F401  (sets MUJOCO_GL before mujoco is imported)
import mujoco
import numpy as np
import pytest

import edge_steer.sim.panda as sim_controllers
from edge_steer.geometry import quat_to_mat, rot_z
from edge_steer.sim.panda import (
    CartesianImpedance, ControlException, JointPosition, SimGripper, SimPanda, SimPandaContext,
)
from edge_steer.franka.types import Errors, GripperState, RobotMode, RobotState
from edge_steer.franka.arm import HAND_YAW, Q_MAX, Q_MIN, Q_START, fk
from edge_steer.sim.scene import Entity, Placement, SceneSpec
from edge_steer.sim.world import World

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "panda_fk_reference.json").read_text())
REF_QS = [np.array(s["q"]) for s in FIXTURE["samples"]]
DOWN = np.array([1.0, 0.0, 0.0, 0.0])  # (x, y, z, w): the hand pointing at the table


def _homogeneous(rot=np.eye(3), pos=(0.0, 0.0, 0.0)) -> np.ndarray:
    t = np.eye(4)
    t[:3, :3], t[:3, 3] = rot, pos
    return t


@pytest.fixture
def make_robot():
    """SimPanda factory whose robots (and 1 kHz threads) are always closed."""
    robots = []

    def make(world: World | None = None, realtime: bool = False) -> SimPanda:
        robots.append(SimPanda(world, realtime=realtime))
        return robots[-1]

    yield make
    for r in robots:
        thread = r._thread
        r.close()
        assert thread is None or not thread.is_alive(), "SimPanda.close() left its control thread running"


# ================================================================================================
# Kinematics
# ================================================================================================
@pytest.mark.parametrize("sample", FIXTURE["samples"], ids=lambda s: "q=" + ",".join(f"{x:.2f}" for x in s["q"][:3]))
def test_flange_pose_matches_libfranka_reference(sample):
    # panda_py.fk puts the EE 0.103 m past the flange; Desk's default (ours) is 0.1034 m: compare flanges.
    ee_in_flange = _homogeneous(rot_z(-np.pi / 4), (0.0, 0.0, 0.103))
    ref_flange = np.array(sample["O_T_EE"]) @ np.linalg.inv(ee_in_flange)
    np.testing.assert_allclose(fk(np.array(sample["q"]), tcp=False), ref_flange, atol=1e-9)


def test_fk_tcp_is_the_flange_plus_the_hand_offset():
    for q in REF_QS:
        np.testing.assert_allclose(fk(q), fk(q, tcp=False) @ _homogeneous(rot_z(HAND_YAW), (0, 0, 0.1034)),
                                   atol=1e-12)
    with pytest.raises(ValueError, match="7 joint angles"):
        fk(np.zeros(6))


def test_mjcf_arm_is_built_from_the_published_table():
    world = World(SceneSpec(objects=()))
    hand = world.model.body("hand").id
    rng = np.random.default_rng(7)
    qs = REF_QS + [rng.uniform(Q_MIN, Q_MAX) for _ in range(25)]
    for q in qs:
        world.data.qpos[world.qadr] = q
        mujoco.mj_forward(world.model, world.data)
        pos, rot = world.tcp_pose()
        np.testing.assert_allclose(_homogeneous(rot, pos), fk(q), atol=1e-9)
        # the hand body sits on the flange, turned by the hand's yaw
        hand_pose = _homogeneous(world.data.xmat[hand].reshape(3, 3), world.data.xpos[hand])
        np.testing.assert_allclose(hand_pose, fk(q, tcp=False) @ _homogeneous(rot_z(HAND_YAW)), atol=1e-9)


def test_mjcf_joint_limits_are_the_published_limits():
    m = World(SceneSpec(objects=())).model
    ranges = np.array([m.jnt_range[m.joint(f"joint{i}").id] for i in range(1, 8)])
    assert all(m.jnt_limited[m.joint(f"joint{i}").id] for i in range(1, 8))
    np.testing.assert_array_equal(ranges[:, 0], Q_MIN)
    np.testing.assert_array_equal(ranges[:, 1], Q_MAX)


# ================================================================================================
# One control script, written against panda-py
# ================================================================================================
# Which sim class stands for which panda_py class.
ROLES = {
    "Panda": (SimPanda, "Panda"),
    "PandaContext": (SimPandaContext, "PandaContext"),
    "RobotState": (RobotState, "libfranka.RobotState"),
    "CartesianImpedance": (CartesianImpedance, "controllers.CartesianImpedance"),
    "JointPosition": (JointPosition, "controllers.JointPosition"),
    "Gripper": (SimGripper, "libfranka.Gripper"),
    "GripperState": (GripperState, "libfranka.GripperState"),
}
# Every member the control script touches, one line each: (role, member, role of what it returns).
# A call added to the script must be added here (test_the_script_uses_exactly_the_api_table checks).
API = [
    ("Panda", "recover", None),
    ("Panda", "move_to_start", None),
    ("Panda", "move_to_joint_position", None),
    ("Panda", "get_state", "RobotState"),
    ("Panda", "get_pose", None),
    ("Panda", "get_position", None),
    ("Panda", "get_orientation", None),
    ("Panda", "q", None),
    ("Panda", "create_context", "PandaContext"),
    ("Panda", "start_controller", None),
    ("Panda", "stop_controller", None),
    ("Panda", "raise_error", None),
    ("PandaContext", "ok", None),
    ("PandaContext", "time", None),
    ("RobotState", "q", None),
    ("RobotState", "dq", None),
    ("RobotState", "O_T_EE", None),
    ("RobotState", "robot_mode", None),
    ("RobotState", "current_errors", None),
    ("CartesianImpedance", "__init__", "CartesianImpedance"),
    ("CartesianImpedance", "set_control", None),
    ("JointPosition", "__init__", "JointPosition"),
    ("JointPosition", "set_control", None),
    ("Gripper", "homing", None),
    ("Gripper", "move", None),
    ("Gripper", "grasp", None),
    ("Gripper", "read_once", "GripperState"),
    ("GripperState", "width", None),
    ("GripperState", "is_grasped", None),
]
RETURNS = {(role, member): ret for role, member, ret in API if ret}


class Recorder:
    """Stands in for a sim object and logs every (role, member) the script touches.

    Role "controllers" stands for the `panda_py.controllers` module: calling one of its classes logs
    (class, "__init__"). Values of members listed in RETURNS come back wrapped as well.
    """

    def __init__(self, target, role: str, log: set):
        self._target, self._role, self._log = target, role, log

    def __getattr__(self, name):
        target, role, log = self._target, self._role, self._log
        value = getattr(target, name)
        key = (name, "__init__") if role == "controllers" else (role, name)
        log.add(key)
        if not callable(value):
            return Recorder(value, RETURNS[key], log) if key in RETURNS else value

        def call(*args, **kwargs):
            args = [a._target if isinstance(a, Recorder) else a for a in args]
            kwargs = {k: v._target if isinstance(v, Recorder) else v for k, v in kwargs.items()}
            result = value(*args, **kwargs)
            return Recorder(result, RETURNS[key], log) if key in RETURNS else result

        return call


def control_script(robot, gripper, controllers, seconds: float = 1.0) -> dict:
    """The runtime's use of the arm, written for panda-py (`controllers` = panda_py.controllers).

    Returns what it observed; `seconds` scales the controller segments.
    """
    seen = {}
    robot.recover()
    seen["homed"] = robot.move_to_start()
    state = robot.get_state()
    seen["q0"], seen["dq0"] = np.array(state.q), np.array(state.dq)
    seen["O_T_EE"], seen["pose"] = np.array(state.O_T_EE), robot.get_pose()
    x0, quat = robot.get_position(), robot.get_orientation()
    seen["x0"], seen["quat"], seen["quat_wxyz"] = x0, quat, robot.get_orientation(scalar_first=True)

    # Cartesian impedance: glide 5 cm along each axis, orientation held, nullspace at the start q.
    ctrl = controllers.CartesianImpedance(impedance=np.diag([1000.0] * 3 + [50.0] * 3), damping_ratio=1.0,
                                          nullspace_stiffness=0.5, filter_coeff=1.0)
    robot.start_controller(ctrl)
    target = x0 + np.array([0.05, -0.05, -0.05])
    ctx = robot.create_context(frequency=100, max_runtime=seconds + 0.5)
    while ctx.ok():
        s = min(1.0, ctx.time / seconds)
        ctrl.set_control(x0 + s * (target - x0), quat, seen["q0"])
    seen["cart_target"], seen["cart_reached"], seen["cart_quat"] = target, robot.get_position(), robot.get_orientation()
    robot.stop_controller()
    robot.raise_error()

    # Joint space: a blocking move, then joint impedance back to where we started.
    q1 = seen["q0"] + np.array([0.2, 0.0, 0.0, 0.0, 0.0, 0.0, -0.3])
    seen["moved"] = robot.move_to_joint_position(q1, speed_factor=0.3)
    seen["q1"], seen["q1_reached"] = q1, np.array(robot.q)
    jp = controllers.JointPosition()
    robot.start_controller(jp)
    ctx = robot.create_context(frequency=100, max_runtime=seconds + 0.5)
    while ctx.ok():
        s = min(1.0, ctx.time / seconds)
        jp.set_control(q1 + s * (seen["q0"] - q1))
    seen["jp_reached"] = np.array(robot.get_state().q)
    robot.stop_controller()

    # Gripper.
    seen["homing"] = gripper.homing()
    seen["width_home"] = gripper.read_once().width
    seen["half_open"] = gripper.move(0.04, 0.1)
    seen["width_half"] = gripper.read_once().width
    seen["grasp_empty"] = gripper.grasp(0.02, 0.1, 20.0)  # nothing between the fingers
    seen["is_grasped_empty"] = gripper.read_once().is_grasped
    state = robot.get_state()
    seen["errors"], seen["mode"] = bool(state.current_errors), state.robot_mode
    return seen


def _check_script(seen: dict, cart_tol: float, joint_tol: float) -> None:
    assert seen["homed"]
    np.testing.assert_allclose(seen["q0"], Q_START, atol=0.01)
    assert np.max(np.abs(seen["dq0"])) < 0.05
    # O_T_EE is column-major, and it is the pose get_pose/get_position/get_orientation report
    assert seen["O_T_EE"].shape == (16,)
    o_t_ee = seen["O_T_EE"].reshape(4, 4, order="F")
    np.testing.assert_allclose(o_t_ee, seen["pose"], atol=1e-6)
    np.testing.assert_allclose(o_t_ee[3], [0, 0, 0, 1])
    np.testing.assert_allclose(o_t_ee[:3, 3], seen["x0"], atol=1e-6)
    np.testing.assert_allclose(quat_to_mat(seen["quat"]), o_t_ee[:3, :3], atol=1e-6)
    np.testing.assert_allclose(o_t_ee, fk(seen["q0"]), atol=2e-3)  # frames are fk's (state is 1 tick apart)
    assert np.linalg.norm(seen["quat"]) == pytest.approx(1.0)
    np.testing.assert_allclose(seen["quat_wxyz"], np.roll(seen["quat"], 1))
    # targets reached
    assert np.linalg.norm(seen["cart_reached"] - seen["cart_target"]) < cart_tol
    assert abs(np.dot(seen["cart_quat"], seen["quat"])) > np.cos(0.02 / 2)  # orientation held within 0.02 rad
    assert seen["moved"]
    np.testing.assert_allclose(seen["q1_reached"], seen["q1"], atol=0.01)
    np.testing.assert_allclose(seen["jp_reached"], seen["q0"], atol=joint_tol)
    assert seen["homing"] and seen["width_home"] == pytest.approx(0.08, abs=0.002)
    assert seen["half_open"] and seen["width_half"] == pytest.approx(0.04, abs=0.002)
    assert seen["grasp_empty"] is False and seen["is_grasped_empty"] is False
    assert seen["errors"] is False and seen["mode"] != RobotMode.kReflex


def test_control_script_stepped_reaches_its_targets(make_robot):
    robot = make_robot(realtime=False)
    log: set = set()
    seen = control_script(Recorder(robot, "Panda", log), Recorder(SimGripper(robot), "Gripper", log),
                          Recorder(sim_controllers, "controllers", log))
    _check_script(seen, cart_tol=0.004, joint_tol=0.01)
    assert {(r, m) for r, m, _ in API} == log, "the control script and the API table disagree"


def test_control_script_runs_on_the_1khz_thread(make_robot):
    robot = make_robot(realtime=True)
    assert robot._thread is not None and robot._thread.is_alive()
    t0 = time.perf_counter()
    seen = control_script(robot, SimGripper(robot), sim_controllers, seconds=0.4)
    wall = time.perf_counter() - t0
    _check_script(seen, cart_tol=0.006, joint_tol=0.02)
    # the physics ran at (about) wall-clock pace, 1 ms per tick
    assert robot.get_state().time.to_sec() == pytest.approx(wall, rel=0.35)
    assert robot.loop.period_errors.percentiles(50)[0] < 0.0004       # the median tick is within 0.4 ms of 1 ms


def test_the_1khz_loop_moves_the_arm_while_the_caller_only_sleeps(make_robot):
    robot = make_robot(realtime=True)
    ctrl = CartesianImpedance()
    robot.start_controller(ctrl)
    x0, quat = robot.get_position(), robot.get_orientation()
    t_sim0, ticks0 = robot.get_state().time.to_sec(), robot.loop.period_errors.n
    ctrl.set_control(x0 + np.array([0.0, 0.0, -0.04]), quat)
    heights = []
    for _ in range(6):  # the test thread only sleeps and samples
        time.sleep(0.1)
        heights.append(robot.get_position()[2])
    assert heights[-1] < x0[2] - 0.03                       # it moved toward the target...
    assert heights[0] < x0[2] - 0.002                       # ...already in the first 100 ms
    assert robot.get_state().time.to_sec() - t_sim0 > 0.35           # sim time advanced on its own
    assert robot.loop.period_errors.n - ticks0 > 350
    thread = robot._thread
    robot.close()
    assert not thread.is_alive()
    t_closed = robot.get_state().time.to_sec()
    time.sleep(0.02)
    assert robot.get_state().time.to_sec() == t_closed               # and nothing ticks after close()


# ================================================================================================
# Conformance with panda-py (where it is installed)
# ================================================================================================
def _their_class(path: str):
    panda_py = pytest.importorskip("panda_py")
    import panda_py.controllers  # noqa: F401
    import panda_py.libfranka  # noqa: F401
    obj = panda_py
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside brackets and quotes."""
    parts, depth, quote, start, i = [], 0, None, 0, 0
    while i < len(text):
        c = text[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(text[start:])
    return parts


_NO_DEFAULT = object()


def _literal(text: str):
    text = text.strip()
    if text.startswith("array(") and text.endswith(")"):
        return np.array(ast.literal_eval(text[len("array("):-1]), dtype=float)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def pybind_overloads(func, name: str) -> list[list[tuple[str, object]]]:
    """[(param, default or _NO_DEFAULT), ...] per overload, from a pybind11 docstring; `self` dropped."""
    overloads = []
    for m in re.finditer(rf"^\s*(?:\d+\.\s+)?{re.escape(name)}\((.*)\)\s*->.*$", func.__doc__ or "", re.M):
        params = []
        for part in _split_top(m.group(1), ", "):
            if not part.strip():
                continue
            pieces = _split_top(part, " = ")
            pname = pieces[0].split(":", 1)[0].strip()
            if pname != "self":
                params.append((pname, _literal(pieces[1]) if len(pieces) > 1 else _NO_DEFAULT))
        overloads.append(params)
    return overloads


def _same_default(ours, theirs) -> bool:
    if ours is inspect.Parameter.empty or theirs is _NO_DEFAULT:
        return ours is inspect.Parameter.empty and theirs is _NO_DEFAULT
    if isinstance(ours, (bool, str)) or isinstance(theirs, (bool, str)):
        return type(ours) is type(theirs) and ours == theirs
    ours, theirs = np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)
    return ours.shape == theirs.shape and np.allclose(ours, theirs, rtol=1e-7, atol=1e-7)


def test_pybind_signature_parser():
    doc = ("f(*args, **kwargs)\nOverloaded function.\n\n"
           "1. f(self: m.C, waypoints: collections.abc.Sequence[typing.Annotated[numpy.typing.ArrayLike, "
           "numpy.float64, \"[7, 1]\"]], k: typing.SupportsFloat = 0.2) -> bool\n\n"
           "2. f(self: m.C, position: typing.Annotated[numpy.typing.ArrayLike, numpy.float64, \"[3, 1]\"], "
           "m: typing.Annotated[numpy.typing.ArrayLike, numpy.float64, \"[2, 2]\"] = array([[1., 0.], [ 0., 2.]]), "
           "flag: bool = False) -> None\n")
    fake = type("F", (), {"__doc__": doc})
    (a, b) = pybind_overloads(fake, "f")
    assert [n for n, _ in a] == ["waypoints", "k"] and a[0][1] is _NO_DEFAULT and a[1][1] == 0.2
    assert [n for n, _ in b] == ["position", "m", "flag"] and b[2][1] is False
    np.testing.assert_array_equal(b[1][1], [[1.0, 0.0], [0.0, 2.0]])
    assert _same_default(np.diag([1.0, 2.0]), b[1][1]) and not _same_default(np.eye(2), b[1][1])
    assert not _same_default(0, False) and _same_default(inspect.Parameter.empty, _NO_DEFAULT)


@pytest.mark.parametrize("role,member", [(r, m) for r, m, _ in API], ids=[f"{r}.{m}" for r, m, _ in API])
def test_panda_py_has_what_the_script_uses(role, member):
    ours, their_path = ROLES[role]
    theirs = _their_class(their_path)
    assert hasattr(theirs, member), f"panda_py.{their_path} has no {member!r}"
    their_member = inspect.getattr_static(theirs, member)
    our_member = inspect.getattr_static(ours, member, None)
    our_is_field = member in getattr(ours, "__dataclass_fields__", {})
    assert our_member is not None or our_is_field, f"{ours.__name__} has no {member!r}"
    if isinstance(their_member, property) or not callable(their_member):  # a value, not a call
        assert our_is_field or isinstance(our_member, property), f"{ours.__name__}.{member} must be an attribute"
        return
    assert inspect.isfunction(our_member), f"{ours.__name__}.{member} must be a method"
    overloads = pybind_overloads(getattr(theirs, member), member)
    assert overloads, f"could not read the signature of panda_py.{their_path}.{member}"
    if hasattr(our_member, "overloads"):   # overloaded as pybind's: every one of theirs is one of ours, and back
        from edge_steer.sim.panda import _REQUIRED
        ours_all = [[(n, inspect.Parameter.empty if d is _REQUIRED else d) for n, d in o] for o in our_member.overloads]
        assert len(ours_all) == len(overloads)
        for mine, their_params in zip(ours_all, overloads):
            assert [n for n, _ in mine] == [n for n, _ in their_params], (mine, their_params)
            assert all(_same_default(o, t) for (_, o), (_, t) in zip(mine, their_params)), (mine, their_params)
        return
    our_params = [(p.name, p.default) for p in inspect.signature(our_member).parameters.values() if p.name != "self"]
    # some overload has our parameters: same names, same order, equal defaults
    for their_params in overloads:
        if [n for n, _ in their_params] == [n for n, _ in our_params] and all(
                _same_default(o, t) for (_, o), (_, t) in zip(our_params, their_params)):
            return
    pytest.fail(f"{ours.__name__}.{member}{inspect.signature(our_member)} matches no overload of "
                f"panda_py.{their_path}.{member}: {overloads}")


# ================================================================================================
# Bad input and faults
# ================================================================================================
@pytest.mark.parametrize("position,orientation,q_nullspace", [
    (np.zeros(2), DOWN, Q_START),                                  # position shape
    (np.zeros((3, 2)), DOWN, Q_START),
    (np.zeros(3), DOWN[:3], Q_START),                              # orientation shape
    (np.zeros(3), DOWN, Q_START[:6]),                              # nullspace shape
    (np.array([0.4, np.nan, 0.3]), DOWN, Q_START),                 # NaN
    (np.array([0.4, 0.0, np.inf]), DOWN, Q_START),
    (np.zeros(3), np.array([np.nan, 0, 0, 1.0]), Q_START),
    (np.zeros(3), np.array([1.0, 1.0, 0.0, 0.0]), Q_START),        # not a unit quaternion
    (np.zeros(3), np.zeros(4), Q_START),
], ids=["pos2", "pos3x2", "quat3", "null6", "pos-nan", "pos-inf", "quat-nan", "quat-norm2", "quat-zero"])
def test_cartesian_set_control_rejects_bad_targets(position, orientation, q_nullspace):
    with pytest.raises(ValueError):
        CartesianImpedance().set_control(position, orientation, q_nullspace)


@pytest.mark.parametrize("position,velocity", [
    (np.zeros(6), np.zeros(7)), (Q_START, np.zeros(3)), (np.full(7, np.nan), np.zeros(7)),
    (Q_START, np.array([0, 0, 0, np.inf, 0, 0, 0])),
], ids=["q6", "dq3", "q-nan", "dq-inf"])
def test_joint_set_control_rejects_bad_targets(position, velocity):
    with pytest.raises(ValueError):
        JointPosition().set_control(position, velocity)


def test_set_control_copies_its_arguments(make_robot):
    robot = make_robot(realtime=False)
    ctrl = CartesianImpedance()
    robot.start_controller(ctrl)
    x0, quat = robot.get_position(), robot.get_orientation()
    target = x0 + np.array([0.0, 0.0, -0.02])
    ctrl.set_control(target, quat)
    target[:] = np.nan  # the caller reuses its buffer: the 1 kHz loop must not see that
    quat[:] = 0.0
    robot.step_until(robot.world.time + 0.5)
    np.testing.assert_allclose(robot.get_position(), x0 + [0, 0, -0.02], atol=0.003)
    assert robot.get_state().current_errors == Errors()


@pytest.mark.parametrize("positions", [
    Q_MAX + 0.05, Q_MIN - 0.05, np.where(np.arange(7) == 3, 0.1, Q_START),  # joint 4 must stay negative
    np.stack([Q_START, Q_MAX + 0.05]),                                       # a bad waypoint
], ids=["above", "below", "q4-positive", "waypoint"])
def test_move_outside_joint_limits_raises_and_does_not_move(make_robot, positions):
    robot = make_robot(realtime=False)
    q = robot.q
    with pytest.raises(ValueError, match="joint limits"):
        robot.move_to_joint_position(positions)
    np.testing.assert_array_equal(robot.q, q)


def test_bad_motion_arguments_raise(make_robot):
    robot = make_robot(realtime=False)
    with pytest.raises(ValueError):
        robot.move_to_joint_position(Q_START[:6])
    with pytest.raises(ValueError):
        robot.move_to_joint_position(Q_START, speed_factor=0.0)
    with pytest.raises(ValueError):
        robot.create_context(frequency=0)
    with pytest.raises(ValueError):
        robot.create_context(frequency=2000)
    with pytest.raises(TypeError):
        robot.start_controller("CartesianImpedance")


def test_injected_fault_stops_everything_until_recover(make_robot):
    robot = make_robot(realtime=False)
    gripper = SimGripper(robot)
    ctrl = CartesianImpedance()
    robot.start_controller(ctrl)
    assert robot.get_state().robot_mode == RobotMode.kMove
    robot.inject_fault("cartesian_reflex")
    ctx = robot.create_context(frequency=100)
    assert ctx.ok()  # the first ok() does not tick; the next one runs the faulting tick
    with pytest.raises(ControlException, match="cartesian_reflex"):
        ctx.ok()
    state = robot.get_state()
    assert state.current_errors == Errors(["cartesian_reflex"]) and state.robot_mode == RobotMode.kReflex
    with pytest.raises(ControlException):
        robot.raise_error()
    with pytest.raises(ControlException):
        robot.create_context(frequency=100).ok()
    with pytest.raises(ControlException):
        robot.start_controller(CartesianImpedance())
    with pytest.raises(ControlException):
        robot.move_to_start()
    q = robot.q
    robot.step_until(robot.world.time + 0.3)             # the brakes hold the arm meanwhile
    assert np.max(np.abs(robot.q - q)) < 1e-3
    assert gripper.move(0.04, 0.1)                       # the gripper is another device: it still works
    robot.recover()
    state = robot.get_state()
    assert state.current_errors == Errors() and state.robot_mode == RobotMode.kIdle
    robot.raise_error()
    assert robot.create_context(frequency=100).ok()
    robot.start_controller(CartesianImpedance())
    assert robot.get_state().robot_mode == RobotMode.kMove


def test_fault_on_the_1khz_thread_reaches_the_caller(make_robot):
    robot = make_robot(realtime=True)
    robot.start_controller(CartesianImpedance())
    ctx = robot.create_context(frequency=200)
    assert ctx.ok()
    robot.inject_fault()
    time.sleep(0.02)
    assert robot.get_state().robot_mode == RobotMode.kReflex
    with pytest.raises(ControlException, match="communication_constraints_violation"):
        ctx.ok()


class _Exploding(CartesianImpedance):
    def _torque(self, world):
        if self.get_time() > 0.05:
            raise np.linalg.LinAlgError("SVD did not converge")
        return super()._torque(world)


def test_a_controller_crash_on_the_1khz_thread_is_a_fault_not_a_dead_loop(make_robot):
    robot = make_robot(realtime=True)
    robot.start_controller(_Exploding())
    ctx = robot.create_context(frequency=100, max_runtime=1.0)
    with pytest.raises(ControlException, match="control_loop_exception"):
        while ctx.ok():
            pass
    assert robot._thread.is_alive()                      # the loop survived and holds the arm
    t = robot.get_state().time.to_sec()
    time.sleep(0.02)
    assert robot.get_state().time.to_sec() > t
    robot.recover()
    robot.start_controller(CartesianImpedance())


# ================================================================================================
# Gripper
# ================================================================================================
def test_grasp_and_lift_a_cube(make_robot):
    world = World(SceneSpec(objects=(Placement(Entity("cube", "red"), (0.5, 0.0)),)))
    robot = make_robot(world, realtime=False)
    gripper = SimGripper(robot)
    ctrl = CartesianImpedance(np.diag([1000.0] * 3 + [50.0] * 3))
    robot.start_controller(ctrl)

    def glide(target, seconds=1.0):  # a step target would trip the velocity reflex, as on the real arm
        start = robot.get_position()
        ctx = robot.create_context(frequency=200, max_runtime=seconds + 0.4)
        while ctx.ok():
            s = min(1.0, ctx.time / seconds)
            ctrl.set_control(start + s * (np.asarray(target) - start), DOWN)

    cube0 = world.object_pos(0)
    glide([0.5, 0.0, 0.12])
    glide([0.5, 0.0, 0.022])
    np.testing.assert_allclose(world.object_pos(0), cube0, atol=0.003)  # we did not knock it over
    assert gripper.grasp(0.044, 0.1, 40.0)
    state = gripper.read_once()
    assert state.is_grasped and state.width == pytest.approx(0.044, abs=0.005) and state.max_width == 0.08
    hand0, cube1 = robot.get_position(), world.object_pos(0)
    glide(hand0 + [0.0, 0.0, 0.10])
    hand1, cube2 = robot.get_position(), world.object_pos(0)
    assert hand1[2] - hand0[2] == pytest.approx(0.10, abs=0.005)
    assert cube2[2] - cube1[2] == pytest.approx(hand1[2] - hand0[2], abs=0.01)  # it rose with the hand
    assert gripper.read_once().is_grasped
    assert gripper.move(0.08, 0.1)                                             # open: it drops
    state = gripper.read_once()
    assert state.width == pytest.approx(0.08, abs=0.002) and not state.is_grasped
    robot.step_until(world.time + 0.5)
    assert world.object_pos(0)[2] < cube1[2] + 0.01


@pytest.mark.parametrize("call", [
    lambda g: g.move(-0.001, 0.1), lambda g: g.move(0.0801, 0.1), lambda g: g.move(0.04, 0.0),
    lambda g: g.grasp(0.09, 0.1, 20.0), lambda g: g.grasp(-0.01, 0.1, 20.0),
    lambda g: g.grasp(0.04, 0.1, 0.0), lambda g: g.grasp(0.04, 0.1, 500.0),
], ids=["move-neg", "move-wide", "move-speed0", "grasp-wide", "grasp-neg", "grasp-force0", "grasp-force500"])
def test_gripper_rejects_out_of_range_commands(make_robot, call):
    robot = make_robot(realtime=False)
    gripper = SimGripper(robot)
    with pytest.raises(ValueError):
        call(gripper)
    assert gripper.read_once().width == pytest.approx(0.08, abs=1e-6)  # nothing was commanded


def test_gripper_widths_at_the_limits_are_accepted(make_robot):
    robot = make_robot(realtime=False)
    gripper = SimGripper(robot)
    assert gripper.move(0.0, 0.2) and gripper.read_once().width == pytest.approx(0.0, abs=0.002)
    assert gripper.move(0.08, 0.2) and gripper.read_once().width == pytest.approx(0.08, abs=0.002)


def test_simpanda_threads_are_independent_per_instance(make_robot):
    a, b = make_robot(realtime=True), make_robot(realtime=True)
    assert a._thread is not b._thread
    names = [t.name for t in threading.enumerate()]
    assert names.count("simpanda-1khz") >= 2
    a.close()
    t = b.get_state().time.to_sec()
    time.sleep(0.02)
    assert b.get_state().time.to_sec() > t
