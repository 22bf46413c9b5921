"""The setpoint stage in the robot's process (`realtime.motion = "process"`, runtime/motion.py): what the
daemon writes (holds, chunks) reaches the stage, what the stage makes (segments, executed actions,
faults, the commanded pose) comes back, and the daemon does its job through it."""

from __future__ import annotations

import numpy as np
import pytest

from edge_steer.client import Client
from edge_steer.runtime.config import ConfigError, RatesConfig, SafetyConfig, ServeConfig
from edge_steer.runtime.daemon import Daemon
from edge_steer.runtime.launch import free_endpoint, wait_for
from edge_steer.runtime.setpoint import Chunk
from edge_steer.runtime.messages import MotionSpec
from edge_steer.franka.arm import Q_START
from edge_steer.runtime.panda_process import PandaProcess
from edge_steer.runtime.robot_process import RemoteCartesianImpedance
from edge_steer.sim.panda_process import SimPandaProcess
from edge_steer.sim.tasks import get_task

pytestmark = pytest.mark.timeout(120)


def test_the_retired_thread_modes_are_refused_and_process_is_deprecated():
    assert ServeConfig.sim().realtime.motion == "" and ServeConfig.sim().robot.sim_loop == ""
    with pytest.raises(ConfigError, match=r"realtime.motion = 'thread' is retired: .*506 ticks a minute against 24"):
        ServeConfig.sim().with_(realtime={"motion": "thread"})
    with pytest.raises(ConfigError, match=r"robot.sim_loop = 'thread' is retired: .*7.3 %"):
        ServeConfig.sim().with_(robot={"sim_loop": "thread"})
    with pytest.raises(ConfigError, match="realtime.motion is retired"):
        ServeConfig.sim().with_(realtime={"motion": "elsewhere"})
    with pytest.warns(FutureWarning, match="realtime.motion is deprecated"):
        ServeConfig.sim().with_(realtime={"motion": "process"})
    with pytest.warns(FutureWarning, match="robot.sim_loop is deprecated"):
        ServeConfig.sim().with_(robot={"sim_loop": "process"})
    with pytest.raises(ConfigError, match="control_hz must be 1000"):
        ServeConfig.sim().with_(rates={"control_hz": 500})


TWIN = "edge_steer.sim.panda:connect_twin"


@pytest.fixture(params=["sim", "panda"])
def arm(request):
    """The stage beside the sim twin's own loop, and beside the panda backend's child (panda_py.Panda's
    place taken by the twin: libfranka's loop is then SimPanda's thread in that child)."""
    if request.param == "sim":
        scene = get_task("red_cube_on_blue_plate").sample_scene(np.random.default_rng(0), 96)
        a = SimPandaProcess(scene.spec, Q_START, rt_priority=0, motion=MotionSpec(RatesConfig(), SafetyConfig(), Q_START),
                            grasp_force=40.0)
    else:
        a = PandaProcess("172.16.0.2", rt_priority=0, motion=MotionSpec(RatesConfig(), SafetyConfig()), connect=TWIN)
    yield a
    a.close()


def _pose(arm):
    from edge_steer.geometry import mat_to_quat
    t = arm.get_pose()
    return t[:3, 3].copy(), mat_to_quat(t[:3, :3])


def test_holds_chunks_executed_actions_and_faults_cross_the_process_boundary(arm):
    sp = arm.motion
    p0, q0 = _pose(arm)
    sp.reset(p0, q0)
    arm.start_controller(RemoteCartesianImpedance())
    assert sp.hold_reason == "idle"
    sp.hold_reason = None
    assert sp.hold_reason is None            # what was asked, even before the stage's next tick
    seg0 = sp.segment
    assert sp.wait_boundary(1.0) and sp.segment > seg0
    actions = np.zeros((10, 7))
    actions[:, 0] = 0.004                    # +4 mm per segment in x, gripper open
    sp.inbox = Chunk(actions, sp.segment, 0.0, 1)
    done = wait_for(lambda: [e for e in sp.take_executed() if e[1][0] == 0.004], timeout=5.0, what="executed")
    assert done[0][1].shape == (7,)
    wait_for(lambda: sp.commanded[0][0] > p0[0] + 0.006, timeout=5.0, what="the commanded pose moving in +x")
    wait_for(lambda: _pose(arm)[0][0] > p0[0] + 0.004, timeout=5.0, what="the arm following")
    assert sp.take_fault() is None and sp.rejected == 0
    with pytest.raises(ValueError, match=r"\(1..64, 7\)"):
        sp.inbox = Chunk(np.zeros((3, 6)), sp.segment, 0.0, 2)
    # a non-finite action makes a non-finite target: the stage rejects it, brakes and reports why
    bad = actions.copy()
    bad[:, 1] = np.nan
    sp.inbox = Chunk(bad, sp.segment, 0.0, 3)
    reason = wait_for(sp.take_fault, timeout=5.0, what="the fault")
    assert "non-finite" in reason and sp.hold_reason == "rejected_setpoint" and sp.rejected >= 1
    assert sp.take_fault() is None           # reported once
    assert np.all(np.isfinite(sp.commanded[0]))
    timing = sp.timing()
    assert timing["ticks"] > 100 and "robot's loop" in timing["scheduling"]


def test_a_stop_does_not_wait_for_a_request_in_flight_and_a_dead_child_raises_at_once(arm):
    import threading
    sp = arm.motion
    sp.reset(*_pose(arm))
    arm.start_controller(RemoteCartesianImpedance())
    sp.hold_reason = None
    wait_for(lambda: sp.driving, timeout=5.0, what="the stage driving the controller")
    done = threading.Event()
    with arm._rpc_lock:      # as while the monitor waits for a timing reply: the request socket is taken
        worker = threading.Thread(target=lambda: (arm.stop_controller(), done.set()), daemon=True)
        worker.start()
        worker.join(timeout=2.0)
        assert done.is_set(), "stop_controller queued behind the request in flight"
        assert not sp.driving    # acknowledged after the tick that stopped it had published
    arm.start_controller(RemoteCartesianImpedance())     # and a controller starts again after it
    wait_for(lambda: sp.driving, timeout=5.0, what="driving again")
    arm._proc.kill()
    arm._proc.wait()
    with pytest.raises(Exception, match="exited"):
        arm.stop_controller()


def test_the_daemon_does_and_records_the_task_with_the_stage_in_the_robot_process(tmp_path):
    from edge_steer.data import Dataset
    cmd, tel = free_endpoint(), free_endpoint()
    cfg = ServeConfig.sim().with_(zmq={"command": cmd, "telemetry": tel}, engine={"backend": "expert"},
                                  record={"dir": str(tmp_path / "rec")})
    d = Daemon(cfg).start()
    c = Client(cmd, tel, timeout_ms=5000)
    try:
        assert d.setpoint is d.robot.arm.motion
        c.record(True)
        c.instruct("put the red cube on the blue plate")
        wait_for(lambda: c.status()["state"] != "RUNNING", timeout=60.0, step=0.2, what="the episode's end")
        s = c.status()
        assert s["transitions"][-1]["why"] == "task_success", s["transitions"]
        assert "robot's loop" in s["setpoint_loop"]["scheduling"] and s["setpoint_loop"]["rejected"] == 0
        c.record(False)
        wait_for(lambda: c.status()["recorder"]["saved_episodes"] == 1, what="the recorded episode")
        ds = Dataset(tmp_path / "rec")
        ep = ds.episode(ds.episodes[0].index)
        actions = ep["action"]          # the executed actions, paired with their observations by segment
        assert ds.num_episodes == 1 and len(actions) > 20 and np.abs(actions[:, :3]).max() > 0
        assert set(np.unique(actions[:, 6])) == {0.0, 1.0}     # it opened, grasped and let go
        msg = next(iter(c.telemetry(timeout_ms=2000)))
        assert len(msg["setpoint"]) == 7 and np.allclose(msg["setpoint"][:3], msg["tcp"][:3], atol=0.02)
        # e-stop drops the robot process's controller at once; recover starts a new one
        c.instruct("put the red cube on the blue plate")
        assert c.estop()["state"] == "FAULT" and d.robot.read().mode == "kIdle"
        assert c.recover()["state"] == "IDLE" and d.robot.read().mode == "kMove"
    finally:
        c.close()
        d.close()


def test_the_panda_backend_runs_the_stage_in_a_child_that_owns_the_arm(monkeypatch):
    """open_robot on the panda backend with the stage in the robot's process: the daemon never connects
    to the arm itself; it reads the state the child publishes and drives the gripper through it."""
    import edge_steer.runtime.panda_process as pp
    from edge_steer.runtime.config import RobotConfig
    from edge_steer.runtime.robot import open_robot
    cfg = ServeConfig.sim()
    monkeypatch.setattr(pp, "CONNECT", TWIN)
    h = open_robot(RobotConfig(backend="panda", host="172.16.0.2"), motion=(cfg.rates, cfg.safety))
    try:
        assert isinstance(h.arm, PandaProcess) and h.arm.motion is not None and h.sim is None
        r = h.read()
        assert r.mode == "kIdle" and r.errors == [] and abs(r.gripper_width - 0.08) < 1e-6
        assert np.allclose(h.q_nullspace, Q_START, atol=1e-6)
        ctrl = h.make_controller()
        h.arm.start_controller(ctrl)
        assert h.read().mode == "kMove"
        h.gripper.command(True)            # through the child's gripper driver
        wait_for(lambda: h.read().gripper_width < 0.01, timeout=5.0, what="the fingers closing")
        assert "own process" in h.arm.loop_timing()["scheduling"]
    finally:
        h.close()
    assert h.arm._proc.poll() is not None


def test_the_panda_child_says_why_it_could_not_connect(monkeypatch):
    from pathlib import Path

    from edge_steer.runtime.robot import RobotError
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", here + ":" + __import__("os").environ.get("PYTHONPATH", ""))
    with pytest.raises(RobotError, match=r"Panda at 192\.0\.2\.7: RuntimeError: no arm answers at 192\.0\.2\.7 "
                                         r"\(enforce_realtime=True\)"):
        PandaProcess("192.0.2.7", enforce_realtime=True, motion=MotionSpec(RatesConfig(), SafetyConfig()),
                     connect="fake_franka:refuse")
    with pytest.raises(RobotError, match="connect must be 'module:function'"):
        PandaProcess("192.0.2.7", connect="fake_franka")
