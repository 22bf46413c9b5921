"""The plant: what the daemon drives — the robot, its cameras and the setpoint port — opened, started
and closed together, so a sim scene can be swapped for a fresh one as a whole.

The setpoint port is the daemon's narrow view of the 1 kHz setpoint stage (`SetpointPort`), which runs in
the robot's own process; `RemoteSetpoint` (runtime/motion.py) answers it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from edge_steer.runtime.camera import CameraStage, open_camera
from edge_steer.runtime.config import ConfigError, ServeConfig
from edge_steer.runtime.robot import RobotHandle, RobotReading, open_robot
from edge_steer.runtime.safety import SafetyFilter, SafetyViolation, check_robot_errors
from edge_steer.runtime.setpoint import Chunk

log = logging.getLogger("edge_steer.serve")


class SetpointPort(Protocol):
    """What the daemon's stages read and write of the setpoint stage, wherever it runs."""
    hold_reason: str | None          # None: chunks drive the arm; else why it holds
    inbox: Chunk | None              # the newest chunk (write-only for the policy stage)
    controller: Any                  # the running controller, None once stopped
    q_nullspace: np.ndarray
    measured_p: np.ndarray
    segment: int
    boundary_time: float
    ticks: int
    missed_ticks: int

    @property
    def commanded(self) -> tuple[list[float], tuple[float, ...]]: ...
    @property
    def anchor(self) -> tuple[list[float], tuple[float, ...]]: ...
    def wait_boundary(self, timeout: float) -> bool: ...
    def reset(self, p, q) -> None: ...
    def take_executed(self) -> list[tuple[int, np.ndarray]]: ...
    def take_fault(self) -> str | None: ...
    def timing(self) -> dict: ...
    def clear_timing(self) -> None: ...
    def start(self, priority: int = 0, cpu: int = -1) -> str | None: ...
    def stop(self) -> None: ...
    def scheduling(self) -> str: ...


@dataclass
class Plant:
    robot: RobotHandle
    cameras: CameraStage
    setpoint: SetpointPort
    filter: SafetyFilter          # the start pose's check (the stage filters the setpoints where it runs)
    owned: bool                   # opened by `open_plant` from the config (so a fresh scene can be opened alike)
    seed: int | None = None       # sim: the scene's seed

    @property
    def sim(self):
        return self.robot.sim

    def read(self) -> RobotReading:
        return self.robot.read()

    def start_controller(self) -> RobotReading:
        """A fresh controller at the measured pose (start, recover). Refuses a robot that reports errors
        or a TCP outside the workspace box, with the reason."""
        r = self.robot.read()
        check = check_robot_errors(r.errors, r.mode)
        if check:
            raise SafetyViolation(f"robot reports errors at start ({check}); recover it first")
        self.filter.reset(r.position, r.quat)
        self.setpoint.measured_p = r.position.copy()
        self.setpoint.reset(r.position, r.quat)
        ctrl = self.robot.make_controller()
        self.robot.arm.start_controller(ctrl)
        self.setpoint.controller = ctrl
        return r

    def stop_controller(self) -> None:
        """Drop the controller at once (e-stop): the setpoint stage stops writing first."""
        self.setpoint.controller = None
        self.robot.arm.stop_controller()

    def hold_here(self) -> None:
        """Re-anchor the hold at the measured pose, so a paused arm stops where it is rather than going
        on to the last commanded target, which the impedance controller trails by millimetres. A pose the
        filter would refuse keeps the braking hold the stage already took."""
        try:
            r = self.robot.read()
        except Exception as e:  # noqa: BLE001 - no reading (the monitor faults on it): the braking hold stays
            log.warning("pause: cannot read the robot (%s); holding at the braking point", e)
            return
        if np.isfinite(r.position).all() and np.isfinite(r.quat).all() and self.filter.inside(list(r.position)):
            self.setpoint.reset(r.position, r.quat)

    def start_loops(self, cfg: ServeConfig) -> None:
        """Cameras, then the 1 kHz setpoint loop at the configured scheduling."""
        self.cameras.start()
        rt = cfg.realtime
        robot_refused = getattr(self.robot.arm, "rt_refused", None)   # a robot process's loop (sim twin or arm's child)
        if robot_refused and rt.required:
            raise ConfigError(f"realtime.required: the robot process's 1 kHz loop: {robot_refused}")
        refused = self.setpoint.start(rt.priority, rt.cpu)
        if refused and rt.required:
            raise ConfigError(f"realtime.required: {refused}")
        if refused:
            log.warning("setpoint loop stays %s: %s", self.setpoint.scheduling(), refused)
        else:
            log.info("setpoint loop scheduling: %s", self.setpoint.scheduling())

    def close(self) -> None:
        """Stop the loops, the cameras, the controller and the robot. The caller has set a hold."""
        self.setpoint.stop()
        self.cameras.stop()
        try:
            self.robot.arm.stop_controller()
        except Exception as e:  # noqa: BLE001
            log.warning("stop_controller at shutdown: %s", e)
        self.robot.close()


def open_plant(cfg: ServeConfig, robot: RobotHandle | None = None, cameras=None, seed: int | None = None) -> Plant:
    """Open the configured robot (sim: with scene seed `seed`, default robot.seed) and cameras, and the
    setpoint port: the stage in the robot's process (realtime.motion = "process") or a thread here."""
    owned = robot is None and cameras is None
    if seed is not None and seed != cfg.robot.seed:
        cfg = replace(cfg, robot=replace(cfg.robot, seed=seed))
    robot = robot or open_robot(cfg.robot, enforce_realtime=cfg.realtime.required, motion=(cfg.rates, cfg.safety),
                                stage_priority=cfg.realtime.priority)
    try:
        world = robot.sim.world if robot.sim is not None else None
        stage = CameraStage(cameras if cameras is not None else [open_camera(c, world) for c in cfg.cameras],
                            read_timeout_ms=int(max(100, cfg.safety.stale_frame_ms)))
    except BaseException:
        robot.close()
        raise
    filt = SafetyFilter(cfg.safety, 1.0 / cfg.rates.control_hz)
    # the stage runs in the robot's process with its own filter; the one here only checks the start pose
    setpoint = getattr(robot.arm, "motion", None)
    if setpoint is None:
        robot.close()
        raise ConfigError("the robot has no setpoint stage in its process: open it with "
                          "open_robot(..., motion=(rates, safety))")
    setpoint.q_nullspace = np.asarray(robot.q_nullspace, dtype=float)
    return Plant(robot, stage, setpoint, filt, owned, cfg.robot.seed if robot.sim is not None else None)
