"""The arm in its own process: a child that owns `panda_py.Panda`, with the setpoint stage beside it.

The daemon does not connect to the arm itself. This child holds the one FCI connection libfranka allows,
and the gripper's. Its loop (runtime/robot_child.py) runs the setpoint stage at 1 kHz (SCHED_FIFO, its
own GIL), sets the CartesianImpedance controller's targets, and publishes the arm's state to the daemon.
libfranka's own 1 kHz control loop is the C++ thread panda-py starts beside it; the loop here reads
`get_state()` (the latest state libfranka's thread cached) and hands on the targets.

How the child connects is a `module:function` (default `connect_panda_py`); `edge_steer.sim.panda:connect_twin`
answers with the sim twin (SimPanda, its controllers, SimGripper), which is how the tests run this path
without an arm. numpy only until it connects: no torch, no MuJoCo (tests/test_lean_imports.py).
"""

from __future__ import annotations

import importlib
import logging
import sys
from types import SimpleNamespace

import numpy as np

from edge_steer.franka.gripper import GripperDriver
from edge_steer.franka.types import Duration, RobotError, error_list, robot_mode
from edge_steer.realtime import LIBFRANKA_PRIORITY
from edge_steer.runtime import messages as m
from edge_steer.runtime.robot_child import Reading, RobotChild
from edge_steer.runtime.robot_process import RobotProcess
from edge_steer.runtime.shm import ROBOT, RobotLayout

log = logging.getLogger("edge_steer.serve.robot")

CONNECT = m.PandaBackend.connect


def connect_panda_py(host: str, enforce_realtime: bool):
    """(arm, gripper, controllers module) on the real robot; RobotError saying why not. libfranka refuses
    to run its control loop without SCHED_FIFO when `enforce_realtime` (panda-py's default only tries)."""
    try:
        import panda_py
        from panda_py import controllers, libfranka
    except ImportError as e:
        raise RobotError(f"the panda backend needs panda-python (pip install 'edge-steer[robot]'): {e}") from e
    try:
        rt = libfranka.RealtimeConfig.kEnforce if enforce_realtime else libfranka.RealtimeConfig.kIgnore
        return panda_py.Panda(host, realtime_config=rt), libfranka.Gripper(host), controllers
    except Exception as e:  # noqa: BLE001 - libfranka raises its own types
        raise RobotError(f"cannot connect to the Panda at {host}: {e}") from e


def _resolve(spec: str):
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"connect must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


# ----------------------------------------------------------------------------------------------
# Child
# ----------------------------------------------------------------------------------------------
class PandaChild(RobotChild):
    def connect(self, backend: m.PandaBackend) -> RobotLayout:
        self.arm, gripper, self.controllers = _resolve(backend.connect)(backend.host, backend.enforce_realtime)
        # libfranka's gripper calls block for the whole motion: the driver runs them on its own thread
        # (panda-py releases the GIL inside them, so the 1 kHz loop runs on meanwhile)
        self.gripper = GripperDriver(gripper, backend.grasp_force, asynchronous=False)
        return RobotLayout()

    def start_controller(self, kind: str, params: dict):
        c = self.controllers
        ctrl = c.CartesianImpedance(**params) if kind == "cartesian" else c.JointPosition(**params)
        self.arm.start_controller(ctrl)
        return ctrl

    def stop_controller(self) -> None:
        self.arm.stop_controller()

    def recover(self) -> None:
        self.arm.recover()

    def read(self) -> Reading:
        st = self.arm.get_state()
        return Reading(st.time.to_sec(), robot_mode(st.robot_mode).value, np.asarray(st.O_T_EE, dtype=float),
                       np.asarray(st.tau_J, dtype=float), np.asarray(st.q, dtype=float),
                       np.asarray(st.dq, dtype=float), float(self.gripper.width), error_list(st.current_errors))

    def gripper_command(self):
        return self.gripper.command

    def default_nullspace(self) -> np.ndarray:
        return np.asarray(self.arm.q, dtype=float)

    def shutdown(self) -> None:
        # the loop ended (closed, or the daemon died): leave the arm under libfranka's brakes, not a stale target
        try:
            self.arm.stop_controller()
        except Exception as e:  # noqa: BLE001 - none running
            log.debug("stop_controller at shutdown: %s", e)
        self.gripper.close()


# ----------------------------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------------------------
class _PublishedGripper:
    """libfranka.Gripper's subset GripperDriver calls, for the daemon: the width comes from the child's
    published state, open/close go to the child's driver (one-way, as the stage's own)."""

    def __init__(self, robot: "PandaProcess"):
        self._robot = robot

    def read_once(self):
        s = self._robot.snapshot()[1]
        return SimpleNamespace(width=float(s[ROBOT.gripper]), time=Duration.from_sec(float(s[ROBOT.time])))

    def grasp_async(self, width: float, speed: float, force: float, *_) -> None:
        self._robot.request(m.Gripper(True))

    def move_async(self, width: float, speed: float) -> None:
        self._robot.request(m.Gripper(False))


class PandaProcess(RobotProcess):
    """panda_py.Panda in a child process (the daemon's side). `motion`: run the setpoint stage in the
    child; `self.motion` is then the daemon's handle on it (runtime/motion.py)."""

    Error = RobotError

    def __init__(self, host: str, enforce_realtime: bool = False, grasp_force: float = 20.0,
                 rt_priority: int = LIBFRANKA_PRIORITY, cpu: int = -1, motion: m.MotionSpec | None = None,
                 connect: str | None = None, hooks: tuple[str, ...] = ()):
        self.what = f"the robot process for the Panda at {host}"
        self.start_hint = " (is the arm reachable there, with FCI activated in Desk?)"
        self.host = host
        backend = m.PandaBackend(host, bool(enforce_realtime), float(grasp_force), connect or CONNECT)
        self._spawn("edge_steer.runtime.panda_process", RobotLayout(),
                    m.Hello(backend, rt_priority, cpu, motion=motion, hooks=tuple(hooks)))
        self.gripper = _PublishedGripper(self)


def open_panda(cfg, impedance: np.ndarray, *, enforce_realtime: bool = False, sim_rt_priority=None,
               motion: m.MotionSpec | None = None, stage_priority: int = 10, hooks: tuple[str, ...] = ()):
    """The panda backend (runtime/robot.py's BACKENDS). With `motion`, the arm is owned by a child process
    with the setpoint stage beside it; the daemon reads the state the child publishes and drives the
    gripper through it. Without, the daemon holds panda_py.Panda itself."""
    from edge_steer.runtime.robot import RobotHandle
    from edge_steer.runtime.robot_process import RemoteCartesianImpedance
    if motion is not None:
        arm = PandaProcess(cfg.host, enforce_realtime, cfg.grasp_force, rt_priority=stage_priority, motion=motion,
                           hooks=hooks)
        return RobotHandle(arm, GripperDriver(arm.gripper, cfg.grasp_force, asynchronous=True),
                           lambda: RemoteCartesianImpedance(impedance, 1.0, cfg.nullspace_stiffness),
                           np.asarray(arm.q, dtype=float))
    arm, gripper, controllers = connect_panda_py(cfg.host, enforce_realtime)
    return RobotHandle(arm, GripperDriver(gripper, cfg.grasp_force, asynchronous=False),
                       lambda: controllers.CartesianImpedance(impedance, 1.0, cfg.nullspace_stiffness),
                       np.asarray(arm.q, dtype=float))


if __name__ == "__main__":   # by its importable name: the messages it handles are pickled under that name
    from edge_steer.runtime.panda_process import PandaChild as _Child
    _Child().serve(int(sys.argv[1]), int(sys.argv[2]))
