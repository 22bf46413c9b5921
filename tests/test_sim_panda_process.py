"""SimPanda's 1 kHz loop in its own process: the same behaviour across the process boundary
(motion, reflexes, recovery, the gripper, argument checks), a mirror world that follows the physics,
targets that never leak between controllers, and a dead child reported instead of a frozen state."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from edge_steer.franka.types import Errors, RobotMode
from edge_steer.sim.panda import CartesianImpedance, ControlException, SimGripper
from edge_steer.runtime.robot_process import RemoteCartesianImpedance, RemoteJointPosition
from edge_steer.sim.panda_process import SimPandaProcess
from edge_steer.sim.tasks import get_task

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def arm():
    scene = get_task("red_cube_on_blue_plate").sample_scene(np.random.default_rng(3), 96)
    robot = SimPandaProcess(scene.spec)
    yield robot
    robot.close()


def test_the_loop_moves_the_arm_on_its_own_and_the_mirror_world_follows(arm):
    st0 = arm.get_state()
    assert st0.robot_mode == RobotMode.kIdle and st0.current_errors == Errors()
    ctrl = RemoteCartesianImpedance(nullspace_stiffness=2.0)
    arm.start_controller(ctrl)
    x0, quat = arm.get_position(), arm.get_orientation()
    ctrl.set_control(x0 + np.array([0.0, 0.0, -0.04]), quat, st0.q)
    t0 = time.perf_counter()
    time.sleep(0.8)                                      # this process only sleeps
    st = arm.get_state()
    assert st.robot_mode == RobotMode.kMove
    assert arm.get_position()[2] < x0[2] - 0.03          # the child's loop moved it
    assert st.time.to_sec() - st0.time.to_sec() == pytest.approx(time.perf_counter() - t0, abs=0.25)   # at wall-clock pace
    with arm.world.lock:                                  # the mirror is posed from the newest state
        mirror_x = arm.world.tcp_pose()[0]
        mirror_t = arm.world.time
    now = arm.get_state()
    assert abs(mirror_t - now.time.to_sec()) < 0.05
    assert np.linalg.norm(mirror_x - arm.get_position()) < 2e-3
    timing = arm.loop_timing()
    assert timing["ticks"] > 500 and timing["scheduling"].endswith("(own process)")
    assert timing["period_err_us_p50"] < 1000 and timing["tick_us_p50"] > 0


def test_reflexes_and_recovery_cross_the_process_boundary(arm):
    arm.start_controller(RemoteCartesianImpedance())
    arm.inject_fault("cartesian_reflex")
    time.sleep(0.05)
    st = arm.get_state()
    assert st.current_errors == Errors(["cartesian_reflex"]) and st.robot_mode == RobotMode.kReflex
    with pytest.raises(ControlException, match="cartesian_reflex"):
        arm.raise_error()
    with pytest.raises(ControlException, match="reflex"):
        arm.start_controller(RemoteCartesianImpedance())   # refused in reflex, as libfranka does
    arm.recover()
    assert arm.get_state().current_errors == Errors() and arm.get_state().robot_mode == RobotMode.kIdle
    arm.start_controller(RemoteJointPosition())
    assert arm.get_state().robot_mode == RobotMode.kMove


def test_the_gripper_works_through_the_side_door(arm):
    g = SimGripper(arm)
    assert g.grasp(0.04, 0.2, 30.0) is False    # closes on nothing: not grasped
    assert g.read_once().width < 0.005
    assert g.move(0.08, 0.2) is True
    assert g.read_once().width == pytest.approx(0.08, abs=0.005)


def test_arguments_are_checked_before_anything_crosses(arm):
    ctrl = RemoteCartesianImpedance()
    arm.start_controller(ctrl)
    x, q = arm.get_position(), arm.get_orientation()
    with pytest.raises(ValueError, match="NaN"):
        ctrl.set_control(np.array([np.nan, 0, 0]), q)
    with pytest.raises(ValueError, match="unit quaternion"):
        ctrl.set_control(x, 2 * q)
    with pytest.raises(ValueError, match="3 elements"):
        ctrl.set_control(x[:2], q)
    with pytest.raises(ValueError, match="6x6"):
        RemoteCartesianImpedance(np.eye(3))
    with pytest.raises(TypeError, match="Remote"):
        arm.start_controller(CartesianImpedance())        # an in-process controller cannot run there
    time.sleep(0.1)
    assert arm.get_state().robot_mode == RobotMode.kMove          # none of that reached the loop
    assert np.linalg.norm(arm.get_position() - x) < 2e-3


def test_a_stopped_controllers_target_never_drives_the_next_one(arm):
    old = RemoteCartesianImpedance()
    arm.start_controller(old)
    x0, q = arm.get_position(), arm.get_orientation()
    arm.stop_controller()
    new = RemoteCartesianImpedance()
    arm.start_controller(new)                            # holds where it is until told otherwise
    old.set_control(x0 + np.array([0.0, 0.0, -0.08]), q)  # a stale handle writes the shared target
    time.sleep(0.4)
    assert np.linalg.norm(arm.get_position() - x0) < 3e-3
    new.set_control(x0 + np.array([0.0, 0.0, -0.04]), q)
    time.sleep(0.6)
    assert arm.get_position()[2] < x0[2] - 0.03


def test_a_dead_robot_process_is_reported_not_a_frozen_state(arm):
    arm.get_state()
    os.kill(arm._proc.pid, signal.SIGKILL)
    arm._proc.wait(timeout=5)
    with pytest.raises(ControlException, match="exited"):
        arm.get_state()
    with pytest.raises(ControlException, match="exited"):
        arm.stop_controller()
    with pytest.raises(ControlException, match="exited"):
        with arm.world.lock:                             # the cameras' renders fail too, loudly
            pass
    arm.close()                                          # and closing after it does not hang


def test_the_daemon_runs_the_sim_robot_in_its_own_process_by_default():
    from edge_steer.runtime.config import ConfigError, RobotConfig, ServeConfig
    from edge_steer.runtime.robot import open_robot

    with pytest.raises(ConfigError, match="robot.sim_loop"):
        ServeConfig.sim().with_(robot={"sim_loop": "fiber"})
    robot = open_robot(RobotConfig())
    try:
        assert isinstance(robot.arm, SimPandaProcess) and robot.sim.world is robot.arm.world
        r = robot.read()
        assert r.mode == "kIdle" and r.gripper_width == pytest.approx(0.08, abs=1e-3)
        assert robot.sim.success() is False               # the task predicate reads the mirror
    finally:
        robot.close()
    assert robot.arm._proc.poll() is not None


def test_a_late_reply_is_never_taken_for_the_next_request(arm, monkeypatch):
    import edge_steer.runtime.robot_process as pp
    time.sleep(0.05)
    monkeypatch.setattr(pp, "RPC_TIMEOUT_S", 0.0)
    with pytest.raises(ControlException, match="did not answer"):
        arm.recover()                         # its reply (None) arrives after the caller gave up
    monkeypatch.setattr(pp, "RPC_TIMEOUT_S", 3.0)
    time.sleep(0.05)
    assert arm.loop_timing()["ticks"] > 10   # the answer to this request, not the stale one


def test_the_robot_process_outlives_ctrl_c_and_ends_with_its_owner(arm):
    os.kill(arm._proc.pid, signal.SIGINT)         # Ctrl-C reaches the whole foreground group
    time.sleep(0.1)
    assert arm._proc.poll() is None and arm.get_state().robot_mode == RobotMode.kIdle
    arm._conn.close()                             # the owner goes away without a word
    assert arm._proc.wait(timeout=5) == 0


def test_the_daemon_faults_when_the_robot_process_dies_and_shuts_down_cleanly():
    from edge_steer.client import Client, ClientError
    from edge_steer.runtime.config import ServeConfig
    from edge_steer.runtime.daemon import Daemon
    from edge_steer.runtime.launch import free_endpoint, wait_for

    cmd, tel = free_endpoint(), free_endpoint()
    d = Daemon(ServeConfig.sim().with_(zmq={"command": cmd, "telemetry": tel}, engine={"backend": "expert"})).start()
    c = Client(cmd, tel, timeout_ms=5000)
    try:
        assert c.status()["robot_loop"]["scheduling"].endswith("(own process)")
        os.kill(d.robot.arm._proc.pid, signal.SIGKILL)
        wait_for(lambda: c.status()["state"] == "FAULT", timeout=5)
        assert "exited" in c.status()["fault"]
        with pytest.raises(ClientError, match="recover_failed"):
            c.recover()                                   # a dead robot stays a fault, with the reason
    finally:
        c.close()
        t0 = time.perf_counter()
        d.close()
        assert time.perf_counter() - t0 < 10
