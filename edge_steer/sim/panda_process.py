"""SimPanda's 1 kHz loop in its own process: the sim's stand-in for libfranka's C++ control loop.

On the robot, libfranka's loop is C++ and never waits for Python's GIL; an in-process SimPanda thread
is 100-180 us of Python per tick that takes the GIL from inference, the cameras and the setpoint
stage 1000 times a second (docs/serve.md). Here the physics and the torque controller run in a child
process with their own interpreter, at SCHED_FIFO 20 as libfranka's loop. The process plumbing is the
runtime's (runtime/robot_child.py, robot_process.py, shm.py, messages.py), shared with the arm's own
process; this module adds the sim's parts:

* `SimChild`: the backend, a World and SimPanda ticked by the child's loop through SimPanda's public API;
* `SimPandaProcess`: the parent side, plus the fingers' side door SimGripper drives, fault injection,
  and a mirror `World` posed from the child's state whenever someone takes its lock (cameras, the task's
  success predicate, the scripted expert), so everything that reads the scene reads it as before.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from edge_steer.franka.arm import Q_START
from edge_steer.franka.gripper import GripperDriver
from edge_steer.franka.types import ControlException, RobotMode
from edge_steer.realtime import LIBFRANKA_PRIORITY
from edge_steer.runtime import messages as m
from edge_steer.runtime.robot_child import Reading, RobotChild
from edge_steer.runtime.robot_process import RobotProcess
from edge_steer.runtime.shm import ROBOT, RobotLayout
from edge_steer.sim.panda import DT, CartesianImpedance, JointPosition, SimGripper, SimPanda
from edge_steer.sim.scene import SceneSpec
from edge_steer.sim.world import World


@dataclass(frozen=True)
class SetFingers:
    """SimGripper's command, through the side door (one-way, as the stage's own gripper requests)."""
    width: float
    speed: float
    force: float
    grasping: bool
    one_way = True


@dataclass(frozen=True)
class InjectFault:
    error: str


# ----------------------------------------------------------------------------------------------
# Child: the world and SimPanda, ticked by RobotChild's loop
# ----------------------------------------------------------------------------------------------
class SimChild(RobotChild):
    def connect(self, backend: m.SimBackend) -> RobotLayout:
        world = self.world = World(backend.spec)
        world.reset(backend.q0, backend.finger)
        self.panda = SimPanda(world, realtime=False)   # physics + controller; this process's loop ticks it
        self.gripper = GripperDriver(SimGripper(self.panda), backend.grasp_force, asynchronous=True)
        self._pose = np.eye(4)
        self.add_handler(SetFingers, lambda r: self.panda.set_fingers(r.width, r.speed, r.force, r.grasping))
        self.add_handler(InjectFault, lambda r: self.panda.inject_fault(r.error))
        return RobotLayout(world.model.nq, world.model.nv)

    def start_controller(self, kind: str, params: dict):
        ctrl = CartesianImpedance(**params) if kind == "cartesian" else JointPosition(**params)
        self.panda.start_controller(ctrl)         # raises ControlException in reflex
        return ctrl

    def stop_controller(self) -> None:
        self.panda.stop_controller()

    def recover(self) -> None:
        self.panda.recover()

    def controller_is_running(self, ctrl) -> bool:
        return self.panda.controller is ctrl

    def step(self) -> None:
        self.panda.tick()   # SimPanda's own loop body: a tick that raises faults the arm, never the loop

    def read(self) -> Reading:
        w, p, pose = self.world, self.panda, self._pose
        pos, rot = w.tcp_pose()
        pose[:3, :3], pose[:3, 3] = rot, pos
        errors = p.errors
        mode = RobotMode.kReflex if errors else (RobotMode.kMove if p.controller is not None else RobotMode.kIdle)
        return Reading(w.time, mode.value, pose.ravel(order="F"), w.data.actuator_force[:7], w.data.qpos[w.qadr],
                       w.data.qvel[w.vadr], float(w.data.qpos[w.f_qadr].sum()), errors)

    def publish_extra(self, state: np.ndarray) -> None:
        state[self.lay.qpos] = self.world.data.qpos
        state[self.lay.qvel] = self.world.data.qvel

    def gripper_command(self):
        return self.gripper.command

    def default_nullspace(self) -> np.ndarray:
        return self.panda.q


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
                 motion: m.MotionSpec | None = None, grasp_force: float = 20.0, hooks: tuple[str, ...] = ()):
        """`motion`: run the setpoint stage in the child's loop; `self.motion` is then the daemon's handle
        on it (runtime/motion.py). `hooks`: test instrumentation for the child (Hello.hooks)."""
        self.name = name
        self.world = World(spec)
        self.world.reset(q0, finger)
        self._mirror_seq = -1.0
        backend = m.SimBackend(spec, np.asarray(q0, float), float(finger), float(grasp_force))
        self._spawn("edge_steer.sim.panda_process", RobotLayout(self.world.model.nq, self.world.model.nv),
                    m.Hello(backend, rt_priority, cpu, period=DT, motion=motion, hooks=tuple(hooks)))
        self.world.lock = _MirrorLock(self._refresh_mirror)

    def _refresh_mirror(self) -> None:
        import mujoco
        seq, snap = self.snapshot()
        if seq == self._mirror_seq:
            return
        d, lay = self.world.data, self.layout
        d.time = snap[ROBOT.time]
        d.qpos[:] = snap[lay.qpos]
        d.qvel[:] = snap[lay.qvel]
        mujoco.mj_forward(self.world.model, d)
        self._mirror_seq = seq

    def inject_fault(self, error: str = "communication_constraints_violation") -> None:
        """Sim only: make the next control tick fault as the real robot's reflexes would."""
        self.request(InjectFault(error))

    # --- the fingers (SimGripper's side door, as SimPanda's) ----------------------------------------
    def gripper_reading(self) -> tuple[float, float]:
        s = self.snapshot()[1]
        return float(s[ROBOT.gripper]), float(s[ROBOT.time])

    def set_fingers(self, width: float, speed: float, force: float, grasping: bool) -> None:
        self.request(SetFingers(float(width), float(speed), float(force), bool(grasping)))

    def clock(self) -> float:
        return time.perf_counter()

    def wait_until(self, t: float) -> None:
        time.sleep(max(0.0, t - time.perf_counter()))


if __name__ == "__main__":   # by its importable name: the messages it handles are pickled under that name
    from edge_steer.sim.panda_process import SimChild as _Child
    _Child().serve(int(sys.argv[1]), int(sys.argv[2]))
