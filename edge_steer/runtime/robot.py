"""The robot behind one narrow protocol: the part of panda-py's API the daemon calls.

`SimPanda` answers it in sim, `panda_py.Panda` on the arm (imported only when used). The 1 kHz
controller (CartesianImpedance) runs inside the robot side — libfranka's C++ loop on hardware,
SimPanda's thread in sim — and the setpoint stage only sets its targets.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from edge_steer.runtime.config import RobotConfig

log = logging.getLogger("edge_steer.serve.robot")


class RobotError(RuntimeError):
    pass


@runtime_checkable
class Robot(Protocol):
    """panda_py.Panda's subset: the arm's state, its controller, error recovery."""

    def get_state(self) -> Any: ...

    def get_position(self) -> np.ndarray: ...

    def get_orientation(self, scalar_first: bool = False) -> np.ndarray: ...

    def start_controller(self, controller: Any) -> None: ...

    def stop_controller(self) -> None: ...

    def recover(self) -> None: ...


@runtime_checkable
class Controller(Protocol):
    """panda_py.controllers.CartesianImpedance's setter (position, quaternion x y z w, nullspace q)."""

    def set_control(self, position: np.ndarray, orientation: np.ndarray, q_nullspace: np.ndarray) -> None: ...


@dataclass(frozen=True)
class RobotReading:
    q: np.ndarray
    dq: np.ndarray
    position: np.ndarray
    quat: np.ndarray          # x, y, z, w
    gripper_width: float
    mode: str
    errors: list[str]


class GripperDriver:
    """Open/close without blocking the caller. Sim: SimGripper's async calls. Hardware: libfranka's
    gripper calls block for the whole motion, so a worker thread runs the latest request."""

    def __init__(self, gripper: Any, grasp_force: float, asynchronous: bool):
        self._g, self._force, self._async = gripper, grasp_force, asynchronous
        self.closed = False
        self.width = 0.08
        self._want: bool | None = None
        self._cv = threading.Condition()
        self._running = True
        self._thread = None
        if not asynchronous:
            self._thread = threading.Thread(target=self._worker, name="gripper", daemon=True)
            self._thread.start()

    def command(self, close: bool) -> None:
        if close == self.closed:
            return
        self.closed = close
        if self._async:
            self._do(close)
        else:
            with self._cv:
                self._want = close
                self._cv.notify()

    def _do(self, close: bool) -> None:
        if close:  # grasp "anything between 0 and 8 cm", as the sim env and the demos do
            fn = self._g.grasp_async if self._async else self._g.grasp
            fn(0.04, 0.1, self._force, 0.04, 0.04)
        else:
            fn = self._g.move_async if self._async else self._g.move
            fn(0.08, 0.1)

    def _worker(self) -> None:
        while self._running:
            with self._cv:
                self._cv.wait_for(lambda: self._want is not None or not self._running, timeout=0.2)
                want, self._want = self._want, None
            if want is not None:
                try:
                    self._do(want)
                except Exception as e:  # noqa: BLE001 - reported, the arm side decides
                    log.error("gripper command failed: %s", e)
            try:
                self.width = float(self._g.read_once().width)
            except Exception:  # noqa: BLE001
                pass

    def read_width(self) -> float:
        if self._async:
            self.width = float(self._g.read_once().width)
        return self.width

    def close(self) -> None:
        self._running = False
        if self._thread is not None:
            with self._cv:
                self._cv.notify()
            self._thread.join(timeout=2.0)


@dataclass
class SimCell:
    """The simulated cell: task, sampled scene and the world every sim device shares."""
    task: Any
    scene: Any
    world: Any

    def success(self) -> bool:
        with self.world.lock:
            return bool(self.task.success(self.world))


@dataclass
class RobotHandle:
    arm: Robot
    gripper: GripperDriver
    make_controller: Callable[[], Controller]
    q_nullspace: np.ndarray
    sim: SimCell | None = None

    def read(self) -> RobotReading:
        st = self.arm.get_state()
        t = np.asarray(st.O_T_EE, dtype=float).reshape(4, 4, order="F")
        from edge_steer.geometry import mat_to_quat
        from edge_steer.runtime.robot_process import error_list, mode_name
        return RobotReading(np.asarray(st.q, dtype=float), np.asarray(st.dq, dtype=float), t[:3, 3].copy(),
                            mat_to_quat(t[:3, :3]), self.gripper.read_width(), mode_name(st.robot_mode),
                            error_list(st.current_errors))

    def close(self) -> None:
        self.gripper.close()
        close = getattr(self.arm, "close", None)
        if close is not None:
            close()


def open_robot(cfg: RobotConfig, enforce_realtime: bool = False, sim_rt_priority: int | None = None,
               motion: tuple | None = None, stage_priority: int = 10) -> RobotHandle:
    """Connect the configured arm. `enforce_realtime`: libfranka refuses to run its control loop
    without SCHED_FIFO (panda-py's default only tries). `sim_rt_priority`: the sim twin's loop priority
    (default libfranka's 20; 0 leaves it SCHED_OTHER, for benchmarks that compare). `motion`:
    (RatesConfig, SafetyConfig) to run the setpoint stage in the robot's process: the sim twin's, or on
    the panda backend a child that owns the arm (runtime/panda_process.py); the arm's `motion` is then
    the daemon's handle on it (runtime/motion.py). `stage_priority`: that child's loop on the arm, below
    libfranka's own control thread beside it (realtime.priority)."""
    kt, kr = cfg.impedance
    impedance = np.diag([kt] * 3 + [kr] * 3)
    if cfg.backend == "sim":
        from edge_steer.realtime import LIBFRANKA_PRIORITY
        return _open_sim(cfg, impedance, LIBFRANKA_PRIORITY if sim_rt_priority is None else sim_rt_priority, motion)
    if motion is not None:
        return _open_panda_process(cfg, impedance, enforce_realtime, motion, stage_priority)
    from edge_steer.runtime.panda_process import connect_panda_py
    arm, gripper, controllers = connect_panda_py(cfg.host, enforce_realtime)
    q_null = np.asarray(arm.q, dtype=float)
    return RobotHandle(arm, GripperDriver(gripper, cfg.grasp_force, asynchronous=False),
                       lambda: controllers.CartesianImpedance(impedance, 1.0, cfg.nullspace_stiffness), q_null)


def _open_panda_process(cfg: RobotConfig, impedance: np.ndarray, enforce_realtime: bool, motion: tuple,
                        priority: int) -> RobotHandle:
    """The arm owned by a child process with the setpoint stage beside it (runtime/panda_process.py):
    the daemon reads the state the child publishes and drives the gripper through it."""
    from edge_steer.runtime.panda_process import PandaProcess
    from edge_steer.runtime.robot_process import RemoteCartesianImpedance
    arm = PandaProcess(cfg.host, enforce_realtime, cfg.grasp_force, rt_priority=priority, motion=motion)
    return RobotHandle(arm, GripperDriver(arm.gripper, cfg.grasp_force, asynchronous=True),
                       lambda: RemoteCartesianImpedance(impedance, 1.0, cfg.nullspace_stiffness),
                       np.asarray(arm.q, dtype=float))


def _open_sim(cfg: RobotConfig, impedance: np.ndarray, rt_priority: int, motion: tuple | None = None) -> RobotHandle:
    from edge_steer.sim.panda import CartesianImpedance, SimGripper, SimPanda
    from edge_steer.sim.panda_model import Q_START
    from edge_steer.sim.tasks import get_task
    from edge_steer.sim.world import World

    task = get_task(cfg.task)
    rng = np.random.default_rng(cfg.seed)
    scene = task.sample_scene(rng, 96)
    q0 = Q_START + rng.uniform(-0.05, 0.05, 7)
    if cfg.sim_loop == "process":
        from edge_steer.runtime.robot_process import RemoteCartesianImpedance
        from edge_steer.sim.panda_process import SimPandaProcess
        arm = SimPandaProcess(scene.spec, q0, rt_priority=rt_priority,
                              motion=None if motion is None else (*motion, cfg.grasp_force, q0))
        world, controller = arm.world, RemoteCartesianImpedance
    else:
        if motion is not None:
            raise RobotError("the setpoint stage runs in the sim robot's process only with robot.sim_loop 'process'")
        world = World(scene.spec)
        world.reset(q0)
        arm, controller = SimPanda(world, realtime=True, rt_priority=rt_priority), CartesianImpedance
    return RobotHandle(arm, GripperDriver(SimGripper(arm), cfg.grasp_force, asynchronous=True),
                       lambda: controller(impedance, nullspace_stiffness=cfg.nullspace_stiffness), q0,
                       SimCell(task, scene, world))
