"""The daemon's robot: one narrow protocol (the part of panda-py's API the daemon calls), the handle it
holds, and the backend registry that opens one by name (`sim`: sim/backend.py, `panda`:
runtime/panda_process.py), so the runtime imports neither MuJoCo nor panda-py unless configured.
The 1 kHz controller and the setpoint stage run in the robot's own process (runtime/robot_child.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from edge_steer.franka.gripper import GripperDriver
from edge_steer.franka.types import RobotError, error_list, robot_mode
from edge_steer.geometry import mat_to_quat
from edge_steer.runtime.config import RobotConfig
from edge_steer.runtime.messages import MotionSpec

__all__ = ["BACKENDS", "GripperDriver", "RobotError", "RobotHandle", "SimCell", "open_robot"]

# robot.backend -> the `module:function` that opens it, imported only when configured: the runtime never
# imports the simulator (MuJoCo) or panda-py unless the configuration asks for it
BACKENDS = {
    "sim": "edge_steer.sim.backend:open_sim",
    "panda": "edge_steer.runtime.panda_process:open_panda",
}


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
        return RobotReading(np.asarray(st.q, dtype=float), np.asarray(st.dq, dtype=float), t[:3, 3].copy(),
                            mat_to_quat(t[:3, :3]), self.gripper.read_width(), robot_mode(st.robot_mode).name,
                            error_list(st.current_errors))

    def close(self) -> None:
        self.gripper.close()
        close = getattr(self.arm, "close", None)
        if close is not None:
            close()


def open_robot(cfg: RobotConfig, enforce_realtime: bool = False, sim_rt_priority: int | None = None,
               motion: tuple | None = None, stage_priority: int = 10, hooks: tuple[str, ...] = ()) -> RobotHandle:
    """Connect the configured arm through its backend (BACKENDS). `enforce_realtime`: libfranka refuses to
    run its control loop without SCHED_FIFO (panda-py's default only tries). `sim_rt_priority`: the sim
    twin's loop priority (default libfranka's 20; 0 leaves it SCHED_OTHER, for benchmarks that compare).
    `motion`: (RatesConfig, SafetyConfig) to run the setpoint stage in the robot's process: the sim twin's,
    or on the panda backend a child that owns the arm (runtime/panda_process.py); the arm's `motion` is
    then the daemon's handle on it (runtime/motion.py). `stage_priority`: that child's loop on the arm,
    below libfranka's own control thread beside it (realtime.priority). `hooks`: test instrumentation for
    the robot process (runtime/robot_child.py)."""
    spec = BACKENDS.get(cfg.backend)
    if spec is None:
        raise RobotError(f"unknown robot backend {cfg.backend!r}; one of {sorted(BACKENDS)}")
    module, _, name = spec.partition(":")
    kt, kr = cfg.impedance
    spec_motion = None if motion is None else MotionSpec(*motion)
    return getattr(importlib.import_module(module), name)(cfg, np.diag([kt] * 3 + [kr] * 3), enforce_realtime=enforce_realtime,
                                                          sim_rt_priority=sim_rt_priority, motion=spec_motion,
                                                          stage_priority=stage_priority, hooks=tuple(hooks))
