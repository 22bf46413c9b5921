"""The monitor: at the telemetry rate, read the robot, run the watchdogs, watch the sim task's success,
hand executed actions to the recorder, publish telemetry and feed systemd's watchdog.

It decides nothing about states: what it finds goes to its host (`MonitorHost`, the daemon) as a
fault or a task success, and the state machine decides.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from edge_steer.runtime import sdnotify
from edge_steer.runtime.config import ServeConfig
from edge_steer.runtime.protocol import encode_telemetry
from edge_steer.runtime.safety import JointLimits, check_joints, check_robot_errors, check_watchdogs
from edge_steer.runtime.statemachine import State

log = logging.getLogger("edge_steer.serve")


class MonitorHost(Protocol):
    plant: Any                       # runtime.plant.Plant
    state: State
    running_since: float | None      # perf_counter when RUNNING began, None otherwise
    reading: Any                     # the robot's last reading, written here

    def last_chunk_at(self) -> float | None: ...
    def restart_inference_deadline(self) -> None: ...
    def fault(self, reason: str, stop_controller: bool = False) -> None: ...
    def task_success(self) -> None: ...
    def sim_success(self) -> bool | None: ...
    def drain_executed(self) -> None: ...
    def telemetry(self) -> dict: ...


class SuccessLatch:
    """The sim task counts as done once its predicate has held for `hold_s` without a break. The
    predicate is instantaneous: a cube let go just above the plate, or still rocking after release,
    reads as resting for one check and not the next (a CI run stopped on such an instant)."""

    def __init__(self, hold_s: float):
        self.hold_s = hold_s
        self._since: float | None = None

    def update(self, ok: bool, now: float) -> bool:
        if not ok:
            self._since = None
            return False
        if self._since is None:
            self._since = now
        return now - self._since >= self.hold_s

    def reset(self) -> None:
        self._since = None


class Monitor:
    def __init__(self, cfg: ServeConfig, host: MonitorHost, pub):
        self.cfg, self.host, self.pub = cfg, host, pub
        self.joint_limits = JointLimits.panda()
        self.success_latch = SuccessLatch(cfg.robot.success_hold_s)
        self.telemetry_sent = 0
        self.lock = threading.Lock()        # held for each pass: the plant is swapped between passes
        self._running = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def _loop(self) -> None:
        import zmq
        period = 1.0 / self.cfg.zmq.telemetry_hz
        next_t = time.perf_counter()
        last_ticks, last_notify, k = -1, 0.0, 0
        while self._running:
            k += 1
            with self.lock:
                try:
                    self.once(k)
                except Exception as e:  # noqa: BLE001 - a broken robot link is a fault, not a dead thread
                    if self.host.state != State.FAULT:
                        self.host.fault(f"monitor: {type(e).__name__}: {e}")
                try:
                    self.pub.send_multipart(encode_telemetry(self.host.telemetry()), flags=zmq.NOBLOCK)
                    self.telemetry_sent += 1
                except zmq.Again:
                    pass
            now = time.perf_counter()
            if now - last_notify > 1.0:  # systemd watchdog: only while the 1 kHz side is alive
                ticks = self.host.plant.setpoint.ticks
                if ticks != last_ticks:
                    sdnotify.notify("WATCHDOG=1")
                last_ticks, last_notify = ticks, now
            next_t += period
            delay = next_t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                next_t = time.perf_counter()

    def once(self, k: int) -> None:
        host, plant, safety = self.host, self.host.plant, self.cfg.safety
        sp = plant.setpoint
        r = plant.read()
        host.reading = r
        sp.measured_p = r.position
        state = host.state
        reason = sp.take_fault()
        if reason is not None:  # raised on the 1 kHz side, handled here
            host.fault(reason)
            return
        if state != State.FAULT:
            reason = check_robot_errors(r.errors, r.mode)
            if reason:
                host.fault(reason, stop_controller=True)
                return
            reason = check_joints(r.q, self.joint_limits, safety.joint_margin, r.dq, safety.joint_velocity_share)
            if reason:
                host.fault(reason)
                return
        if state == State.RUNNING:
            v = check_watchdogs(safety, time.perf_counter(), plant.cameras.oldest_age(), host.running_since,
                                host.last_chunk_at())
            if v.fault:
                host.fault(v.fault)
                return
            hr = sp.hold_reason
            if v.hold and hr is None:
                log.warning("hold: %s", v.hold)
                sp.hold_reason = "stale_frame"
            elif not v.hold and hr == "stale_frame":
                log.info("fresh frames again: resuming")
                host.restart_inference_deadline()   # it restarts with the frames
                sp.hold_reason = None
            if (self.cfg.robot.stop_on_success and plant.sim is not None and k % 10 == 0
                    and self.success_latch.update(bool(host.sim_success()), time.perf_counter())):
                host.task_success()
        host.drain_executed()
