"""The reliability harness's cell: an in-process sim daemon whose engine, cameras, robot link and
controllers can be made to fail, with every setpoint the controller receives recorded and checked.

The setpoint recording and the failing setter plug into the robot's process as a harness hook
(`edge_steer.testing.setpoint_probe`); reflexes come from the sim robot's `inject_fault`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_steer.runtime.launch import free_endpoint, wait_for


def pct(a, q: float) -> float | None:
    a = np.asarray(a, float)
    return float(np.percentile(a, q)) if a.size else None


# ---- safety invariant: every setpoint the controller receives, recorded and checked -----------------
class SetpointLog:
    """Every `set_control` the setpoint stage makes, recorded in the robot's process (preallocated, on the
    1 kHz loop: a row copy per tick) and pulled here. `gen` counts controllers: a recover restarts from the measured
    pose, so speed and acceleration are checked within one controller's run, the box everywhere."""

    def __init__(self, capacity: int = 1 << 20):
        from edge_steer.testing.setpoint_probe import SetpointRecorder
        self.rec = SetpointRecorder(capacity)

    def attach_remote(self, arm, every_s: float = 0.5) -> None:
        """The stage runs in the sim robot's process: the child records what it sets
        (edge_steer.testing.setpoint_probe, installed at open_robot), and a thread here pulls the rows every
        `every_s`, so no single reply grows large enough to hold up the child's 1 kHz loop."""
        from edge_steer.testing import setpoint_probe
        setpoint_probe.record_setpoints(arm, len(self.rec.buf))
        self.remote, self._lock = arm, threading.Lock()

        def pull_forever():
            while self.remote is not None:
                time.sleep(every_s)
                try:
                    self.pull()
                except Exception:  # noqa: BLE001 - the robot process closed: the rows so far stay
                    return
        threading.Thread(target=pull_forever, name="setpoint-log", daemon=True).start()

    remote: Any = None

    def pull(self) -> None:
        if self.remote is None:
            return
        with self._lock:
            from edge_steer.testing.setpoint_probe import take_setpoints
            self.rec.extend(*take_setpoints(self.remote))

    def rows(self) -> np.ndarray:
        try:
            self.pull()
        except Exception:  # noqa: BLE001 - closed since: what was pulled is what there is
            pass
        return self.rec.buf[: self.rec.n]

    def check(self, safety, dt: float) -> dict:
        """Measured maxima against the configured limits; `violations` counts samples over a limit."""
        from edge_steer.runtime.safety import qconj, qlog, qmul
        a = self.rows()
        out = {"setpoints": int(len(a)), "controllers": int(self.rec.gen), "overflow": bool(self.rec.overflow), "violations": 0, "max_speed": 0.0,
               "max_accel": 0.0, "max_rot_speed": 0.0, "outside_box": 0, "non_finite": 0}
        if not len(a):
            return out
        p, q = a[:, 2:5], a[:, 5:9]
        lo, hi = np.array(safety.workspace_min), np.array(safety.workspace_max)
        out["non_finite"] = int((~np.isfinite(a[:, 2:9])).any(1).sum())
        out["outside_box"] = int(((p < lo - 1e-12) | (p > hi + 1e-12)).any(1).sum())
        bad = out["non_finite"] + out["outside_box"]
        for g in np.unique(a[:, 1]):
            m = a[:, 1] == g
            pg, qg = p[m], q[m]
            if len(pg) < 3:
                continue
            v = np.diff(pg, axis=0) / dt
            acc = np.diff(v, axis=0) / dt
            w = np.array([qlog(qmul(b, qconj(c))) for c, b in zip(qg[:-1], qg[1:])]) / dt
            out["max_speed"] = max(out["max_speed"], float(np.abs(v).max()))
            out["max_accel"] = max(out["max_accel"], float(np.abs(acc).max()))
            out["max_rot_speed"] = max(out["max_rot_speed"], float(np.linalg.norm(w, axis=1).max()))
            bad += int((np.abs(v) > safety.max_speed * (1 + 1e-6)).any(1).sum())
            bad += int((np.abs(acc) > safety.max_accel * (1 + 1e-4) + 1e-9).any(1).sum())
            bad += int((np.linalg.norm(w, axis=1) > safety.max_rot_speed * (1 + 1e-4)).sum())
        out["violations"] = bad
        out["limits"] = {"workspace": [list(safety.workspace_min), list(safety.workspace_max)],
                         "max_speed": safety.max_speed, "max_accel": safety.max_accel,
                         "max_rot_speed": safety.max_rot_speed}
        return out


# ---- engines and devices with injectable faults -------------------------------------------------------
class FaultyEngine:
    """The sim's scripted expert (the arm does the task) with injectable failures: raise, NaN, slow."""

    def __init__(self, inner):
        self.inner, self.backend = inner, "expert+faults"
        self.mode, self.delay_s = "ok", 0.0

    def predict(self, obs, instruction):
        if self.mode == "raise":
            raise RuntimeError("injected engine failure")
        if self.mode == "slow":
            time.sleep(self.delay_s)
        out = np.array(self.inner.predict(obs, instruction), dtype=float)
        if self.mode == "nan":
            out[2, 0] = np.nan
        if self.mode == "still":  # fuzzing: chunks that move nothing, so any motion is the daemon's doing
            out[:, :6] = 0.0
            out[:, 6] = 0.0
        return out

    def metadata(self):
        return {"backend": self.backend}

    def set_steering(self, delta):
        self.inner.set_steering(delta)


class FlakyCamera:
    """A camera whose cable can be pulled: reads and re-opens fail while `unplugged` (as a RealSense
    does when its USB link drops), then the stage's re-open succeeds once it is plugged back in."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.unplugged = False
        self.reopens = 0

    def start(self) -> None:
        from edge_steer.runtime.camera import CameraError
        if self.unplugged:
            raise CameraError(f"camera {self.name!r}: No device connected")
        self.inner.start()
        self.reopens += 1

    def read(self, timeout_ms: int):
        from edge_steer.runtime.camera import CameraError
        if self.unplugged:
            time.sleep(0.01)
            raise CameraError(f"camera {self.name!r}: device disconnected")
        return self.inner.read(timeout_ms)

    def stop(self) -> None:
        self.inner.stop()


class RobotLink:
    """Cuts the daemon's link to the arm: `get_state` raises (libfranka's NetworkException) and/or the
    controller setter raises (the robot side dropped the controller), until restored."""

    def __init__(self, arm):
        self.arm = arm
        self.state_lost = False
        self.setter_lost = False
        inner_get = arm.get_state

        def get_state():
            if self.state_lost:
                raise RuntimeError("libfranka: Network exception: connection lost")
            return inner_get()
        arm.get_state = get_state


@dataclass
class Cell:
    """An in-process daemon on the sim cell with its fault handles and recorders."""
    daemon: Any
    client: Any
    engine: FaultyEngine
    cameras: list[FlakyCamera]
    link: RobotLink
    log: SetpointLog
    stops: list[float] = field(default_factory=list)  # perf_counter when stop_controller returned
    endpoint: str = ""

    def close(self) -> None:
        self.log.rows()              # the last of a remote record, before its process closes
        self.log.remote = None
        self.client.close()
        self.daemon.close()


def start_cell(tmp: Path, *, stop_on_success: bool = False, curve: dict | None = None, **safety: float) -> Cell:
    """The sim daemon in this process, its engine the scripted expert behind FaultyEngine, every
    camera behind FlakyCamera, every controller's setpoints recorded, and e-stop times logged.
    The setpoint stage runs in the robot's process (realtime.motion "thread" is retired)."""
    from edge_steer.client import Client
    from edge_steer.runtime.camera import open_camera
    from edge_steer.runtime.config import ServeConfig
    from edge_steer.runtime.daemon import Daemon
    from edge_steer.runtime.expert_engine import ExpertEngine
    from edge_steer.runtime.robot import open_robot

    cmd, tel = free_endpoint(), free_endpoint()
    sf = {"stale_frame_ms": 300.0, "camera_fault_ms": 1500.0, "inference_deadline_ms": 400.0,
          "inference_stop_ms": 1200.0, **safety}
    cfg = ServeConfig.sim().with_(zmq={"command": cmd, "telemetry": tel, **(curve or {})}, safety=sf,
                                  engine={"backend": "expert"}, record={"dir": str(tmp / "rec")},
                                  robot={"stop_on_success": stop_on_success})
    from edge_steer.testing.setpoint_probe import HOOK
    robot = open_robot(cfg.robot, motion=(cfg.rates, cfg.safety), hooks=(HOOK,))
    log = SetpointLog()
    log.attach_remote(robot.arm)
    link = RobotLink(robot.arm)
    world = robot.sim.world
    cams = [FlakyCamera(open_camera(c, world)) for c in cfg.cameras]
    engine = FaultyEngine(ExpertEngine(robot.sim))
    d = Daemon(cfg, engine=engine, robot=robot, cameras=cams)
    cell = Cell(d, None, engine, cams, link, log, endpoint=cmd)
    inner_stop = robot.arm.stop_controller

    def stop_controller():
        inner_stop()
        cell.stops.append(time.perf_counter())
    robot.arm.stop_controller = stop_controller
    d.start()
    cell.client = Client(cmd, tel, timeout_ms=5000) if curve is None else None
    return cell


def reset_cell(cell: Cell) -> None:
    """Back to IDLE with every injected fault cleared."""
    cell.engine.mode = "ok"
    for cam in cell.cameras:
        cam.unplugged = False
        cam.inner.pipeline.stalled = False
    cell.link.state_lost = False
    c = cell.client
    st = c.status()["state"]
    if st == "FAULT":
        wait_for(lambda: _try(c.recover), timeout=10, step=0.2)
    elif st != "IDLE":
        c.stop()


def _try(fn) -> bool:
    from edge_steer.client import ClientError
    try:
        fn()
        return True
    except ClientError:
        return False
