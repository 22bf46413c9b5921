"""SimPanda's 1 kHz loop in its own process: the sim's stand-in for libfranka's C++ control loop.

On the robot, libfranka's loop is C++ and never waits for Python's GIL; an in-process SimPanda thread
is 100-180 us of Python per tick that takes the GIL from inference, the cameras and the setpoint
stage 1000 times a second (docs/serve.md). Here the physics and the torque controller run in a child
process with their own interpreter, at SCHED_FIFO 20 as libfranka's loop, and the daemon's side keeps
the narrow panda-py surface it uses. The process plumbing (shared state, requests, the controllers'
remote handles, the setpoint stage beside the loop) is runtime/robot_process.py's, shared with the
arm's own process; this module adds the sim's parts:

* `SimChild`: the child's backend, a World and SimPanda ticked by the child's loop;
* `SimPandaProcess`: the parent side, plus the side door `SimGripper` drives the fingers through, fault
  injection, and a mirror `World` posed from the child's state whenever someone takes its lock
  (cameras, the task's success predicate, the scripted expert), so everything that reads the scene
  reads it as before.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np

from edge_steer.realtime import LIBFRANKA_PRIORITY
from edge_steer.runtime.robot_process import Reading, RobotChild, RobotProcess, StateLayout, mode_code
from edge_steer.sim.panda import DT, ControlException
from edge_steer.sim.panda_model import Q_START
from edge_steer.sim.scene import SceneSpec
from edge_steer.sim.world import World



# ----------------------------------------------------------------------------------------------
# Child: the world and SimPanda, ticked by RobotChild's loop
# ----------------------------------------------------------------------------------------------
class SimChild(RobotChild):
    def connect(self, hello: tuple) -> StateLayout:
        from edge_steer.sim.panda import SimPanda
        spec, q0, finger, self._grasp_force = hello
        world = self.world = World(spec)
        world.reset(q0, finger)
        self.panda = SimPanda(world, realtime=False)   # physics + controller; this process's loop ticks it
        self._pose = np.eye(4)
        return StateLayout(world.model.nq, world.model.nv)

    def start_controller(self, kind: str, params: dict):
        from edge_steer.sim.panda import CartesianImpedance, JointPosition
        ctrl = CartesianImpedance(**params) if kind == "cartesian" else JointPosition(**params)
        self.panda.start_controller(ctrl)         # raises ControlException in reflex
        return ctrl

    def stop_controller(self) -> None:
        self.panda.stop_controller()

    def recover(self) -> None:
        self.panda.recover()

    def controller_is_running(self, ctrl) -> bool:
        return self.panda._controller is ctrl

    def step(self) -> None:
        self.panda._locked_tick()   # SimPanda's own loop body: a tick that raises faults the arm, never the loop

    def read(self) -> Reading:
        w, p, pose = self.world, self.panda, self._pose
        pos, rot = w.tcp_pose()
        pose[:3, :3], pose[:3, 3] = rot, pos
        mode = "kReflex" if p._errors else ("kMove" if p._controller is not None else "kIdle")
        return Reading(w.time, mode_code(mode), pose.ravel(order="F"), w.data.actuator_force[:7], w.data.qpos[w.qadr],
                       w.data.qvel[w.vadr], float(w.data.qpos[w.f_qadr].sum()), p._errors)

    def publish_extra(self, state: np.ndarray) -> None:
        state[self.lay.qpos] = self.world.data.qpos
        state[self.lay.qvel] = self.world.data.qvel

    def request(self, op: str, args: tuple):
        if op == "gripper":
            self.panda._gripper_set(*args)
            return None
        if op == "fault":
            self.panda.inject_fault(*args)
            return None
        if op == "record_setpoints":
            self.recorder = SetpointRecorder(*args)
            if self.motion is not None and self.motion.stage.controller is not None:
                self.motion.stage.controller = self.stage_controller(self.motion.stage.controller)
            return None
        if op == "take_setpoints":
            return self.recorder.take()
        if op == "fail_setter":
            stage = self.motion.stage if self.motion is not None else None
            if stage is None or stage.controller is None:
                raise ValueError("no controller is driven by a stage here")
            stage.controller = _FailingSetter(args[0])
            return None
        return super().request(op, args)

    recorder: "SetpointRecorder | None" = None

    def stage_controller(self, ctrl):
        return ctrl if self.recorder is None else RecordedController(ctrl, self.recorder)

    def motion_side(self, lay, mem, rates, safety, q_nullspace):
        from edge_steer.runtime.robot import GripperDriver
        from edge_steer.sim.panda import SimGripper
        gripper = GripperDriver(SimGripper(self.panda), self._grasp_force, asynchronous=True)
        return super().motion_side(lay, mem, rates, safety, gripper.command, q_nullspace)


class SetpointRecorder:
    """Every pose a controller is set to (t, controller number, x y z, qx qy qz qw), for the reliability
    harness's safety check (tools/bench_reliability.py): here when the stage runs in this process, in
    the daemon when it runs there. Preallocated: the 1 kHz tick only copies a row."""

    def __init__(self, capacity: int):
        self.buf = np.zeros((int(capacity), 9))
        self.n = self.taken = self.gen = 0
        self.overflow = False

    def record(self, gen: int, position, orientation) -> None:
        if self.n < len(self.buf):
            row = self.buf[self.n]
            row[0], row[1], row[2:5], row[5:9] = time.perf_counter(), gen, position, orientation
            self.n += 1
        else:
            self.overflow = True

    def extend(self, rows: np.ndarray, overflow: bool) -> None:
        """Rows recorded elsewhere (the robot process's), appended as far as they fit."""
        k = min(len(rows), len(self.buf) - self.n)
        self.buf[self.n:self.n + k] = rows[:k]
        self.n += k
        self.overflow |= bool(overflow) or k < len(rows)
        if self.n:
            self.gen = int(self.buf[:self.n, 1].max())

    def take(self) -> tuple[np.ndarray, bool]:
        rows = self.buf[self.taken:self.n].copy()
        self.taken = self.n
        return rows, self.overflow


class RecordedController:
    """`inner` (anything with a Cartesian set_control) with every target recorded, as one new controller."""

    def __init__(self, inner, rec: SetpointRecorder):
        rec.gen += 1
        self._inner, self._rec, self._gen = inner, rec, rec.gen

    def set_control(self, position, orientation, q_nullspace):
        self._rec.record(self._gen, position, orientation)
        self._inner.set_control(position, orientation, q_nullspace)


class _FailingSetter:
    """A controller whose setter raises, as panda-py's does once libfranka dropped the controller."""

    def __init__(self, message: str):
        self._message = message

    def set_control(self, *_):
        raise RuntimeError(self._message)


# ----------------------------------------------------------------------------------------------
# Parent: the robot the daemon talks to
# ----------------------------------------------------------------------------------------------
class _MirrorLock:
    """The mirror world's lock: whoever takes it first (not re-entrantly) sees the newest physics."""

    def __init__(self, refresh):
        self._lock = threading.RLock()
        self._depth = 0
        self._refresh = refresh

    def __enter__(self):
        self._lock.acquire()
        self._depth += 1
        if self._depth == 1:
            try:
                self._refresh()
            except BaseException:
                self._depth -= 1
                self._lock.release()
                raise
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        self._lock.release()


class SimPandaProcess(RobotProcess):
    """SimPanda with its 1 kHz loop in a child process. `world` is the mirror the parent's readers use."""

    Error = ControlException
    what = "the simulated robot process"

    def __init__(self, spec: SceneSpec, q0: np.ndarray = Q_START, finger: float = 0.04,
                 rt_priority: int = LIBFRANKA_PRIORITY, cpu: int = -1, name: str = "panda",
                 motion: tuple | None = None):
        """`motion`: (RatesConfig, SafetyConfig, grasp force, q_nullspace) to run the setpoint stage in the
        child's loop; `self.motion` is then the daemon's handle on it (runtime/motion.py)."""
        self.name = name
        self.world = World(spec)
        self.world.reset(q0, finger)
        self._mirror_seq = -1.0
        rates, safety, grasp_force, q_null = motion if motion is not None else (None, None, 20.0, None)
        self._spawn("edge_steer.sim.panda_process", StateLayout(self.world.model.nq, self.world.model.nv),
                    (spec, np.asarray(q0, float), float(finger), float(grasp_force)), rt_priority, cpu,
                    None if motion is None else (rates, safety, q_null), period=DT)
        self.world.lock = _MirrorLock(self._refresh_mirror)

    def _refresh_mirror(self) -> None:
        import mujoco
        seq, snap = self._snapshot()
        if seq == self._mirror_seq:
            return
        d, lay = self.world.data, self._lay
        d.time = snap[lay.time]
        d.qpos[:] = snap[lay.qpos]
        d.qvel[:] = snap[lay.qvel]
        mujoco.mj_forward(self.world.model, d)
        self._mirror_seq = seq

    def inject_fault(self, error: str = "communication_constraints_violation") -> None:
        """Sim only: make the next control tick fault as the real robot's reflexes would."""
        self._rpc("fault", error)

    # --- the reliability harness's handles on the stage here (sim only) ---------------------------
    def record_setpoints(self, capacity: int = 1 << 20) -> None:
        """From now on, record every pose the stage here sets; `take_setpoints` returns the new rows."""
        self._rpc("record_setpoints", int(capacity))

    def take_setpoints(self) -> tuple[np.ndarray, bool]:
        """(rows t, controller, x, y, z, qx, qy, qz, qw since the last take, whether the record overflowed)."""
        return self._rpc("take_setpoints")

    def fail_setter(self, message: str) -> None:
        """Make the stage's next set_control raise `message`, as once the robot side dropped the controller."""
        self._rpc("fail_setter", str(message))

    # --- the fingers (SimGripper's side door) -----------------------------------------------------
    def _gripper_reading(self) -> tuple[float, float]:
        s, lay = self._snapshot()[1], self._lay
        return float(s[lay.gripper]), float(s[lay.time])

    def _gripper_set(self, width: float, speed: float, force: float, grasping: bool) -> None:
        self._rpc("gripper", float(width), float(speed), float(force), bool(grasping))

    def _clock(self) -> float:
        return time.perf_counter()

    def _wait_until(self, t: float) -> None:
        time.sleep(max(0.0, t - time.perf_counter()))


if __name__ == "__main__":
    SimChild().serve(int(sys.argv[1]), int(sys.argv[2]))
