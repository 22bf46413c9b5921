"""SimPanda: kinematics against libfranka, panda-py API conformance, the 1 kHz loop, faults, gripper."""

import inspect
import json
import re
import time
from pathlib import Path

import mujoco
import numpy as np
import pytest

from edge_steer.geometry import quat_to_mat
from edge_steer.sim.panda import (
    CartesianImpedance, ControlException, JointPosition, SimGripper, SimPanda,
)
from edge_steer.sim.panda_model import Q_MAX, Q_MIN, Q_START, fk
from edge_steer.sim.scene import Entity, Placement, SceneSpec
from edge_steer.sim.world import World

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "panda_fk_reference.json").read_text())


def _tz_rz(d, yaw):
    t = np.eye(4)
    c, s = np.cos(yaw), np.sin(yaw)
    t[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    t[2, 3] = d
    return t


@pytest.mark.parametrize("sample", FIXTURE["samples"], ids=lambda s: "q=" + ",".join(f"{x:.2f}" for x in s["q"][:3]))
def test_flange_pose_matches_libfranka(sample):
    # panda_py.fk uses a 0.103 m hand offset, Desk's default (ours) is 0.1034 m: compare at the flange
    ref = np.array(sample["O_T_EE"]) @ np.linalg.inv(_tz_rz(0.103, -np.pi / 4))
    np.testing.assert_allclose(fk(np.array(sample["q"]), tcp=False), ref, atol=1e-9)


def test_mjcf_tcp_equals_dh_kinematics():
    world = World(SceneSpec(objects=()))
    rng = np.random.default_rng(0)
    qs = [np.array(s["q"]) for s in FIXTURE["samples"]] + [rng.uniform(Q_MIN, Q_MAX) for _ in range(10)]
    for q in qs:
        world.data.qpos[world.qadr] = q
        mujoco.mj_forward(world.model, world.data)
        pos, rot = world.tcp_pose()
        t = fk(q)
        np.testing.assert_allclose(pos, t[:3, 3], atol=1e-9)
        np.testing.assert_allclose(rot, t[:3, :3], atol=1e-9)
    rng_lim = world.model.jnt_range[[world.model.joint(f"joint{i}").id for i in range(1, 8)]]
    np.testing.assert_allclose(rng_lim[:, 0], Q_MIN)
    np.testing.assert_allclose(rng_lim[:, 1], Q_MAX)


def control_script(robot, gripper, realtime: bool):
    """The calls the runtime makes, in one script; returns what it observed."""
    seen = {}
    assert robot.move_to_start()
    st = robot.get_state()
    seen["q0"] = np.array(st.q)
    pose = np.array(st.O_T_EE).reshape(4, 4, order="F")
    seen["pose_consistent"] = np.allclose(pose, robot.get_pose(), atol=1e-6)
    x0, q0 = robot.get_position(), robot.get_orientation()
    seen["scalar_first"] = np.allclose(np.roll(q0, 1), robot.get_orientation(scalar_first=True))
    ctrl = CartesianImpedance(impedance=np.diag([1000.0] * 3 + [50.0] * 3), damping_ratio=1.0,
                              nullspace_stiffness=0.5, filter_coeff=1.0)
    robot.start_controller(ctrl)
    target = x0 + np.array([0.05, -0.05, -0.05])
    ctx = robot.create_context(frequency=100, max_runtime=2.0)
    while ctx.ok():
        s = min(1.0, ctx.time / 1.0)
        ctrl.set_control(x0 + s * (target - x0), q0, Q_START)
    seen["cart_err"] = float(np.linalg.norm(robot.get_position() - target))
    robot.stop_controller()
    jp = JointPosition()
    robot.start_controller(jp)
    q1 = np.array(robot.q) + np.array([0.1, 0, 0, 0, 0, 0, -0.1])
    ctx = robot.create_context(frequency=100, max_runtime=1.5)
    while ctx.ok():
        jp.set_control(q1)
    seen["joint_err"] = float(np.max(np.abs(robot.get_state().q - q1)))
    robot.stop_controller()
    assert robot.move_to_joint_position(Q_START, speed_factor=0.3)
    seen["width_open"] = gripper.homing() and gripper.read_once().width
    seen["grasp_empty"] = gripper.grasp(0.02, 0.1, 20.0)  # nothing between the fingers: no grasp
    robot.recover()
    return seen


@pytest.mark.parametrize("realtime", [False, True], ids=["stepped", "realtime-1kHz"])
def test_control_script_runs_against_simpanda(realtime):
    with SimPanda(realtime=realtime) as robot:
        seen = control_script(robot, SimGripper(robot), realtime)
        assert seen["pose_consistent"] and seen["scalar_first"]
        assert seen["cart_err"] < 0.005
        assert seen["joint_err"] < 0.01
        assert seen["width_open"] == pytest.approx(0.08, abs=0.002)
        assert seen["grasp_empty"] is False
        if realtime:
            periods = np.array(robot.tick_periods)
            assert len(periods) > 1000 and np.median(periods) == pytest.approx(0.001, abs=0.0003)


def test_realtime_loop_moves_the_arm_while_the_caller_only_sleeps():
    with SimPanda(realtime=True) as robot:
        ctrl = CartesianImpedance()
        robot.start_controller(ctrl)
        x0 = robot.get_position()
        ctrl.set_control(x0 + [0.0, 0.0, -0.05], robot.get_orientation())
        time.sleep(1.5)
        assert robot.get_position()[2] < x0[2] - 0.04
        assert robot.get_state().time > 1.0  # sim time advanced on its own thread


# --- conformance with panda_py --------------------------------------------------------------------------------
# (our object, their object, method) for every call the runtime and the control script make
CALLS = [
    ("SimPanda", "Panda", "get_state"), ("SimPanda", "Panda", "get_position"),
    ("SimPanda", "Panda", "get_orientation"), ("SimPanda", "Panda", "get_pose"),
    ("SimPanda", "Panda", "move_to_start"), ("SimPanda", "Panda", "move_to_joint_position"),
    ("SimPanda", "Panda", "move_to_pose"), ("SimPanda", "Panda", "start_controller"),
    ("SimPanda", "Panda", "stop_controller"), ("SimPanda", "Panda", "recover"),
    ("SimPanda", "Panda", "create_context"), ("SimPanda", "Panda", "raise_error"),
    ("SimPanda", "Panda", "get_joint_limits_lower"), ("SimPanda", "Panda", "get_joint_limits_upper"),
    ("SimPanda", "Panda", "is_moving"),
    ("CartesianImpedance", "CartesianImpedance", "__init__"), ("CartesianImpedance", "CartesianImpedance", "set_control"),
    ("CartesianImpedance", "CartesianImpedance", "set_impedance"),
    ("CartesianImpedance", "CartesianImpedance", "set_damping_ratio"),
    ("CartesianImpedance", "CartesianImpedance", "set_nullspace_stiffness"),
    ("CartesianImpedance", "CartesianImpedance", "set_filter"), ("CartesianImpedance", "CartesianImpedance", "get_time"),
    ("JointPosition", "JointPosition", "__init__"), ("JointPosition", "JointPosition", "set_control"),
    ("JointPosition", "JointPosition", "set_stiffness"), ("JointPosition", "JointPosition", "set_damping"),
    ("SimGripper", "Gripper", "move"), ("SimGripper", "Gripper", "grasp"), ("SimGripper", "Gripper", "homing"),
    ("SimGripper", "Gripper", "read_once"), ("SimGripper", "Gripper", "stop"),
]
STATE_FIELDS = [("SimRobotState", "RobotState", f) for f in ("q", "dq", "tau_J", "O_T_EE", "time", "robot_mode",
                                                             "current_errors")]
GRIPPER_FIELDS = [("SimGripperState", "GripperState", f) for f in ("width", "max_width", "is_grasped",
                                                                   "temperature", "time")]


def _their(name):
    panda_py = pytest.importorskip("panda_py")
    from panda_py import controllers, libfranka
    for mod in (panda_py, controllers, libfranka):
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AssertionError(f"panda_py has no {name}")


def _ours(name):
    import edge_steer.sim.panda as m
    return getattr(m, name)


def _their_params(func) -> list[list[tuple[str, str | None]]]:
    """Parameter (name, default) lists of each overload in a pybind11 docstring."""
    doc = func.__doc__ or ""
    name = func.__name__
    sigs = re.findall(rf"{name}\(self: [^,)]*(?:, )?(.*?)\) -> ", doc)
    out = []
    for sig in sigs:
        params = []
        for part in re.split(r", (?=[a-z_]+: )", sig):
            if not part:
                continue
            pname = part.split(":")[0].strip()
            default = part.split(" = ", 1)[1] if " = " in part else None
            params.append((pname, default))
        out.append(params)
    return out


def _num(text):
    nums = re.findall(r"-?\d+\.?\d*(?:e-?\d+)?", text.replace("array(", ""))
    return np.array([float(x) for x in nums])


@pytest.mark.parametrize("ours,theirs,method", CALLS, ids=lambda x: x if isinstance(x, str) else None)
def test_method_exists_in_panda_py_with_compatible_parameters(ours, theirs, method):
    their_cls = _their(theirs)
    assert hasattr(their_cls, method), f"panda_py.{theirs} has no {method}"
    our_sig = inspect.signature(getattr(_ours(ours), method))
    our_params = [(p.name, p.default) for p in our_sig.parameters.values() if p.name != "self"]
    overloads = _their_params(getattr(their_cls, method))
    assert overloads, f"could not read panda_py.{theirs}.{method}'s signature"
    # some overload must accept our parameters by the same names, in the same order, with equal defaults
    for their_params in overloads:
        names = [n for n, _ in their_params]
        if names[:len(our_params)] != [n for n, _ in our_params][:len(names)]:
            continue
        ok = True
        for (n, our_default), (_, their_default) in zip(our_params, their_params):
            if their_default is None:
                continue
            if our_default is inspect.Parameter.empty:
                ok = False
                break
            if not np.allclose(np.ravel(np.asarray(our_default, dtype=float)), _num(their_default)):
                ok = False
                break
        if ok and len(our_params) >= len([d for _, d in their_params if d is None]):
            return
    pytest.fail(f"{ours}.{method}{our_sig} matches no overload of panda_py {theirs}.{method}: {overloads}")


@pytest.mark.parametrize("ours,theirs,field", STATE_FIELDS + GRIPPER_FIELDS, ids=lambda x: x if isinstance(x, str) else None)
def test_state_fields_exist_in_panda_py(ours, theirs, field):
    assert hasattr(_their(theirs), field)
    assert field in _ours(ours).__dataclass_fields__


def test_panda_context_api_matches():
    their = _their("PandaContext")
    for attr in ("ok", "num_ticks", "time"):
        assert hasattr(their, attr)


# --- errors and faults --------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    (np.zeros(2), np.array([1.0, 0, 0, 0])),
    (np.zeros(3), np.array([1.0, 1.0, 0, 0])),          # not a unit quaternion
    (np.array([0, np.nan, 0]), np.array([1.0, 0, 0, 0])),
])
def test_cartesian_set_control_rejects_bad_targets(args):
    with pytest.raises(ValueError):
        CartesianImpedance().set_control(*args)


def test_move_outside_joint_limits_raises():
    with SimPanda(realtime=False) as robot:
        with pytest.raises(ValueError, match="joint limits"):
            robot.move_to_joint_position(Q_MAX + 0.1)


def test_reflex_fault_stops_the_controller_until_recover():
    with SimPanda(realtime=False) as robot:
        ctrl = CartesianImpedance()
        robot.start_controller(ctrl)
        robot.inject_fault("cartesian_reflex")
        ctx = robot.create_context(frequency=100)
        ctx.ok()
        with pytest.raises(ControlException, match="cartesian_reflex"):
            ctx.ok()
        st = robot.get_state()
        assert st.robot_mode == "kReflex" and st.current_errors == ["cartesian_reflex"]
        with pytest.raises(ControlException):
            robot.start_controller(CartesianImpedance())
        q = robot.q
        robot.step_until(robot.world.time + 0.3)  # brakes hold the arm while faulted
        assert np.max(np.abs(robot.q - q)) < 1e-3
        robot.recover()
        robot.start_controller(CartesianImpedance())
        assert robot.get_state().robot_mode == "kMove"


def test_grasp_lift_and_release_a_cube():
    world = World(SceneSpec(objects=(Placement(Entity("cube", "red"), (0.5, 0.0)),)))
    with SimPanda(world, realtime=False) as robot:
        gripper = SimGripper(robot)
        ctrl = CartesianImpedance(np.diag([1000.0] * 3 + [50.0] * 3))
        robot.start_controller(ctrl)
        down = np.array([1.0, 0.0, 0.0, 0.0])  # gripper pointing down

        def glide(target, seconds=1.5):  # step targets would trip the velocity reflex, as on the real arm
            start = robot.get_position()
            ctx = robot.create_context(frequency=200, max_runtime=seconds + 0.5)
            while ctx.ok():
                s = min(1.0, ctx.time / seconds)
                ctrl.set_control(start + s * (np.asarray(target) - start), down)

        glide([0.5, 0.0, 0.15])
        glide([0.5, 0.0, 0.022])
        assert gripper.grasp(0.044, 0.1, 40.0) and gripper.read_once().is_grasped
        glide([0.5, 0.0, 0.122])
        assert world.object_pos(0)[2] > 0.09          # the cube rose with the hand
        assert gripper.move(0.08, 0.1)
        robot.step_until(robot.world.time + 1.0)
        assert world.object_pos(0)[2] < 0.03          # and fell when released
        with pytest.raises(ValueError):
            gripper.move(0.1, 0.1)
        with pytest.raises(ValueError):
            gripper.grasp(0.02, 0.1, 500.0)
    np.testing.assert_allclose(quat_to_mat(down), np.diag([1.0, -1.0, -1.0]))
