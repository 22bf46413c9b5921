"""The arm in its own process: a child that owns `panda_py.Panda`, with the setpoint stage beside it.

With `realtime.motion = "process"` on the panda backend the daemon does not connect to the arm itself.
This child holds the one FCI connection libfranka allows, and the gripper's. Its loop runs the setpoint
stage at 1 kHz (SCHED_FIFO, its own GIL), sets the CartesianImpedance controller's targets, and
publishes the arm's state to the daemon. libfranka's own 1 kHz control loop is the C++ thread panda-py
starts beside it. It is the same child as the sim twin's (runtime/robot_process.py); only the backend
differs:

* sim:   the loop steps MuJoCo and the controller itself (sim/panda_process.py);
* panda: libfranka steps the arm; the loop reads `get_state()` (the latest state libfranka's thread
  cached) and hands on the targets.

How the child connects is a `module:function` (default `connect_panda_py`); `sim.panda:connect_twin`
answers with the sim twin (SimPanda, its CartesianImpedance, SimGripper), which is how the tests run
this path without an arm.
"""

from __future__ import annotations

import importlib
import logging
import sys

import numpy as np

from edge_steer.realtime import LIBFRANKA_PRIORITY
from edge_steer.runtime.robot_process import Reading, RobotChild, RobotProcess, StateLayout, error_list, mode_code

log = logging.getLogger("edge_steer.serve.robot")

CONNECT = "edge_steer.runtime.panda_process:connect_panda_py"


def connect_panda_py(host: str, enforce_realtime: bool):
    """(arm, gripper, controllers module) on the real robot; RobotError saying why not. libfranka refuses
    to run its control loop without SCHED_FIFO when `enforce_realtime` (panda-py's default only tries)."""
    from edge_steer.runtime.robot import RobotError
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


def _seconds(t) -> float:
    to_sec = getattr(t, "to_sec", None)       # libfranka's Duration
    return float(to_sec()) if to_sec is not None else float(t)


# ----------------------------------------------------------------------------------------------
# Child
# ----------------------------------------------------------------------------------------------
class PandaChild(RobotChild):
    def connect(self, hello: tuple) -> StateLayout:
        from edge_steer.runtime.robot import GripperDriver
        host, enforce_realtime, grasp_force, connect = hello
        self.arm, gripper, self.controllers = _resolve(connect)(host, enforce_realtime)
        # libfranka's gripper calls block for the whole motion: the driver runs them on its own thread
        # (panda-py releases the GIL inside them, so the 1 kHz loop runs on meanwhile)
        self.gripper = GripperDriver(gripper, grasp_force, asynchronous=False)
        return StateLayout()

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
        return Reading(_seconds(st.time), mode_code(st.robot_mode), np.asarray(st.O_T_EE, dtype=float),
                       np.asarray(st.tau_J, dtype=float), np.asarray(st.q, dtype=float),
                       np.asarray(st.dq, dtype=float), float(self.gripper.width), error_list(st.current_errors))

    def request(self, op: str, args: tuple):
        if op == "gripper":            # the daemon's own open/close, when the stage runs there
            self.gripper.command(bool(args[0]))
            return None
        return super().request(op, args)

    def motion_side(self, lay, mem, rates, safety, q_nullspace):
        q_null = self.arm.q if q_nullspace is None else q_nullspace
        return super().motion_side(lay, mem, rates, safety, self.gripper.command, q_null)

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
        from types import SimpleNamespace
        s, lay = self._robot._snapshot()[1], self._robot._lay
        return SimpleNamespace(width=float(s[lay.gripper]), time=float(s[lay.time]))

    def grasp_async(self, width: float, speed: float, force: float, *_) -> None:
        self._robot._rpc("gripper", True)

    def move_async(self, width: float, speed: float) -> None:
        self._robot._rpc("gripper", False)


class PandaProcess(RobotProcess):
    """panda_py.Panda in a child process (the daemon's side). `motion`: (RatesConfig, SafetyConfig) to run
    the setpoint stage in the child; `self.motion` is then the daemon's handle on it (runtime/motion.py)."""

    what = "the robot process"

    def __init__(self, host: str, enforce_realtime: bool = False, grasp_force: float = 20.0,
                 rt_priority: int = LIBFRANKA_PRIORITY, cpu: int = -1, motion: tuple | None = None,
                 connect: str | None = None):
        from edge_steer.runtime.robot import RobotError
        self.Error = RobotError
        self.what = f"the robot process for the Panda at {host}"
        self.start_hint = " (is the arm reachable there, with FCI activated in Desk?)"
        self.host = host
        self._spawn("edge_steer.runtime.panda_process", StateLayout(), (host, bool(enforce_realtime),
                    float(grasp_force), connect or CONNECT), rt_priority, cpu, None if motion is None else (*motion, None))
        self.gripper = _PublishedGripper(self)


if __name__ == "__main__":
    PandaChild().serve(int(sys.argv[1]), int(sys.argv[2]))
