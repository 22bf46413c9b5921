"""The daemon: the stages wired together, the state machine, command handling, watchdogs, telemetry.

Threads and their one job each (hand-over through latest-value slots and bounded queues):
  camera-<name>  newest frame per camera                          (camera.CameraStage)
  policy         engine at the policy rate on fresh frames -> chunk slot
  (robot proc.)  chunks -> interpolated, safety-filtered controller targets at 1 kHz, in the robot's
                 process (setpoint.SetpointStage there, motion.RemoteSetpoint here)
  monitor        robot state, watchdogs, sim success, recording hand-off, telemetry PUB, sd_notify
  commands       ZMQ ROUTER: decode, validate, `handle`, reply      (server.CommandServer)
  recorder       DatasetWriter                                       (recorder.Recorder)

State machine: IDLE -> RUNNING <-> PAUSED, any -> FAULT -> (recover) -> IDLE; every transition logged.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from edge_steer.runtime import sdnotify
from edge_steer.runtime.camera import CameraStage, open_camera
from edge_steer.runtime.config import ConfigError, ServeConfig
from edge_steer.runtime.protocol import Request, encode_telemetry
from edge_steer.runtime.robot import RobotHandle, open_robot
from edge_steer.runtime.safety import (JointLimits, SafetyFilter, SafetyViolation, check_joints, check_robot_errors,
                                       check_watchdogs)
from edge_steer.runtime.setpoint import Chunk, is_finite_chunk

log = logging.getLogger("edge_steer.serve")


class State(str, enum.Enum):
    IDLE = "IDLE"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    FAULT = "FAULT"


ALLOWED = {
    State.IDLE: {State.RUNNING, State.FAULT},
    State.RUNNING: {State.PAUSED, State.IDLE, State.FAULT},
    State.PAUSED: {State.RUNNING, State.IDLE, State.FAULT},
    State.FAULT: {State.IDLE},
}


class CommandError(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


def build_engine(cfg: ServeConfig, robot: RobotHandle):
    """The configured engine. Loading failures surface as ConfigError with the reason."""
    ec = cfg.engine
    if ec.backend == "expert":
        from edge_steer.runtime.expert_engine import ExpertEngine
        return ExpertEngine(robot.sim)
    try:
        import torch
        torch.set_num_threads(ec.threads)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    from edge_steer.runtime.engine import load_engine
    # engine.threads bounds onnxruntime's intra-op pool as it does torch's: a pool the size of the
    # machine would take the 1 kHz side's core
    options = {"intra_op_threads": ec.threads} if ec.backend == "onnxruntime" else {}
    try:
        return load_engine(ec.path or None, backend=ec.backend, **options)
    except Exception as e:  # noqa: BLE001 - missing checkpoint, corrupt file, missing library
        raise ConfigError(f"cannot load the {ec.backend} engine from {ec.path or 'the default model'}: {e}") from e


class Daemon:
    def __init__(self, cfg: ServeConfig, engine=None, robot: RobotHandle | None = None, cameras=None):
        self._timing = _TimingCache()
        self.cfg = cfg
        self.robot = robot or open_robot(cfg.robot, enforce_realtime=cfg.realtime.required,
                                         motion=(cfg.rates, cfg.safety), stage_priority=cfg.realtime.priority)
        try:
            world = self.robot.sim.world if self.robot.sim is not None else None
            self.cameras = CameraStage(cameras if cameras is not None else [open_camera(c, world) for c in cfg.cameras],
                                       read_timeout_ms=int(max(100, cfg.safety.stale_frame_ms)))
            self.engine = engine if engine is not None else build_engine(cfg, self.robot)
        except BaseException:
            self.robot.close()
            raise
        self.engine_lock = threading.Lock()
        self.filter = SafetyFilter(cfg.safety, 1.0 / cfg.rates.control_hz)
        # the stage runs in the robot's process (runtime/motion.py): the filter here only checks the start
        # pose, the stage's own filters setpoints
        self.setpoint = getattr(self.robot.arm, "motion", None)
        if self.setpoint is None:
            self.robot.close()
            raise ConfigError("the robot has no setpoint stage in its process: open it with "
                              "open_robot(..., motion=(rates, safety))")
        self.setpoint.q_nullspace = np.asarray(self.robot.q_nullspace, dtype=float)
        self.joint_limits = JointLimits.panda()
        self._lock = threading.RLock()
        self.state = State.IDLE
        self.fault_reason: str | None = None
        self.transitions: deque[dict] = deque(maxlen=50)
        self.instruction: str | None = None
        self.steering: str | None = None
        self.episode = 0
        self._episode_start_seg = 0
        self._paused_at_seg = 0
        self.recording = False
        self.recorder = None
        self.chunks_made = 0
        self.chunks_dropped = 0
        self.inference_ms = TimingWindow()
        self.frame_to_policy_ms = TimingWindow()   # oldest frame's capture -> all frames in the policy's hands
        self.latest_chunk: np.ndarray | None = None
        self._running_since: float | None = None
        self._last_chunk_at: float | None = None
        self.success_latch = SuccessLatch(cfg.robot.success_hold_s)
        self.reading = None
        self.shutdown_requested = threading.Event()
        self._stopped = False
        self._threads: list[threading.Thread] = []
        self._telemetry_seq = 0
        self.telemetry_sent = 0
        self.server = None
        self.started_at = time.time()

    # ---- lifetime ------------------------------------------------------------------------------
    def start(self) -> "Daemon":
        from edge_steer.runtime.server import CommandServer
        try:
            self._start_controller()
            self._warm_up()
            self.cameras.start()
            self._start_setpoint_loop()
            self.server = CommandServer(self.cfg.zmq, self)
            self.server.start()
        except BaseException:
            self.close()
            raise
        self._running = True
        for name, fn in (("policy", self._policy_loop), ("monitor", self._monitor_loop)):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("serving: state IDLE, commands on %s, telemetry on %s", self.cfg.zmq.command, self.cfg.zmq.telemetry)
        sdnotify.notify("READY=1\nSTATUS=IDLE")
        return self

    def _start_controller(self) -> None:
        r = self.robot.read()
        check = check_robot_errors(r.errors, r.mode)
        if check:
            raise SafetyViolation(f"robot reports errors at start ({check}); recover it first")
        self.filter.reset(r.position, r.quat)  # refuses a TCP outside the workspace box, with the reason
        self.setpoint.measured_p = r.position.copy()
        self.setpoint.reset(r.position, r.quat)
        ctrl = self.robot.make_controller()
        self.robot.arm.start_controller(ctrl)
        self.setpoint.controller = ctrl
        self.reading = r

    def _warm_up(self) -> None:
        """One inference before serving, so the first real one meets its deadline."""
        if getattr(self.engine, "backend", "") == "expert":
            return
        obs: dict[str, Any] = {f"observation.images.{c.name}": np.zeros((c.height, c.width, 3), np.uint8)
                               for c in self.cfg.cameras}
        obs["observation.state"] = np.array([0.4, 0, 0.3, 1, 0, 0, 0, 0.08], np.float32)
        obs["observation.joints"] = np.zeros(7, np.float32)
        obs.update({"runtime.target": np.array([0.4, 0, 0.3, 1, 0, 0, 0]), "runtime.episode": 0})
        with self.engine_lock:
            self.engine.predict(obs, "warm up")

    def close(self) -> None:
        """Stop everything: hold, commit any recording, close sockets and devices. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        sdnotify.notify("STOPPING=1")
        self._running = False
        with self._lock:
            if self.state == State.RUNNING or self.state == State.PAUSED:
                self._transition(State.IDLE, "shutdown")
                self._end_episode(None, "shutdown")
        self.setpoint.hold_reason = "shutdown"
        for t in self._threads:
            t.join(timeout=2.0)
        if self.server is not None:
            self.server.stop()
        time.sleep(0.05)  # let the hold settle a few ticks before the setter stops
        self.setpoint.stop()
        self.cameras.stop()
        if self.recorder is not None:
            self.recorder.close()
        try:
            self.robot.arm.stop_controller()
        except Exception as e:  # noqa: BLE001
            log.warning("stop_controller at shutdown: %s", e)
        self.robot.close()
        log.info("stopped")

    # ---- state machine -------------------------------------------------------------------------
    def _transition(self, new: State, why: str) -> None:
        old = self.state
        if new not in ALLOWED[old]:
            raise CommandError("bad_state", f"cannot go from {old.value} to {new.value}")
        self.state = new
        self.transitions.append({"t": time.time(), "from": old.value, "to": new.value, "why": why})
        log.info("state %s -> %s (%s)", old.value, new.value, why)
        self.setpoint.hold_reason = None if new == State.RUNNING else new.value.lower()
        self._running_since = time.perf_counter() if new == State.RUNNING else None
        self.success_latch.reset()
        sdnotify.notify(f"STATUS={new.value}")

    def fault(self, reason: str, stop_controller: bool = False) -> None:
        """Any thread: hold (or drop the controller) and latch FAULT until `recover`."""
        if stop_controller:  # e-stop: the controller goes first, bookkeeping after
            self.setpoint.controller = None
            try:
                self.robot.arm.stop_controller()
            except Exception as e:  # noqa: BLE001
                log.error("stop_controller failed: %s", e)
        self.setpoint.hold_reason = "fault"
        with self._lock:
            if self.state == State.FAULT:
                return
            self.fault_reason = reason
            if self.recording and self.recorder is not None and self.state != State.IDLE:
                self.recorder.abort(reason)
            self._transition(State.FAULT, reason)
        log.error("FAULT: %s", reason)

    def _begin_episode(self) -> None:
        self.episode += 1
        self._episode_start_seg = self.setpoint.segment
        self.success_latch.reset()   # a new instruction's episode earns its own success
        if self.recording:
            self.recorder.begin(self.instruction, {"episode": self.episode, **self._sim_meta()})

    def _end_episode(self, success: bool | None, reason: str) -> None:
        if self.recording and self.recorder is not None:
            self._drain_executed()
            self.recorder.end(success, reason)

    def _sim_meta(self) -> dict:
        cell = self.robot.sim
        return {"task_name": cell.task.name, "seed": self.cfg.robot.seed} if cell is not None else {}

    # ---- commands (called by the command server thread) -----------------------------------------
    def handle(self, req: Request) -> dict[str, Any]:
        fn = getattr(self, f"_cmd_{req.cmd}")
        return fn(**req.args) or {}

    def _cmd_status(self) -> dict:
        return self.status()

    def _cmd_instruct(self, text: str, start: bool = True) -> dict:
        with self._lock:
            if self.state == State.FAULT:
                raise CommandError("bad_state", f"in FAULT ({self.fault_reason}): send recover first")
            changed = text != self.instruction
            self.instruction = text
            log.info("instruction: %r", text)
            if self.state == State.RUNNING and changed:
                self._end_episode(None, "new_instruction")
                self._begin_episode()  # chunks of the old instruction in flight are discarded by episode
            elif start and self.state in (State.IDLE, State.PAUSED):
                self._cmd_start()
            return {"state": self.state.value, "instruction": text}

    def _cmd_start(self) -> dict:
        with self._lock:
            if self.state == State.RUNNING:
                return {"state": self.state.value}
            if self.state == State.FAULT:
                raise CommandError("bad_state", f"in FAULT ({self.fault_reason}): send recover first")
            if not self.instruction:
                raise CommandError("no_instruction", "send an instruction first (instruct {text})")
            if self.state == State.IDLE:
                self._begin_episode()
                self._transition(State.RUNNING, "start")
            else:
                self._episode_start_seg += self.setpoint.segment - self._paused_at_seg
                self._transition(State.RUNNING, "resume")
            return {"state": self.state.value}

    def _cmd_pause(self) -> dict:
        with self._lock:
            if self.state != State.RUNNING:
                raise CommandError("bad_state", f"pause needs RUNNING, state is {self.state.value}")
            self._paused_at_seg = self.setpoint.segment
            self._transition(State.PAUSED, "pause")
            return {"state": self.state.value}

    def _cmd_stop(self) -> dict:
        with self._lock:
            if self.state in (State.RUNNING, State.PAUSED):
                self._transition(State.IDLE, "stop")
                self._end_episode(self._sim_success(), "stop")
            elif self.state == State.FAULT:
                raise CommandError("bad_state", "in FAULT: send recover")
            return {"state": self.state.value}

    def _cmd_estop(self) -> dict:
        self.fault("estop", stop_controller=True)
        return {"state": self.state.value, "controller": "stopped"}

    def _cmd_recover(self) -> dict:
        with self._lock:
            if self.state != State.FAULT:
                raise CommandError("bad_state", f"recover needs FAULT, state is {self.state.value}")
            try:
                self.robot.arm.recover()
                self.setpoint.controller = None
                try:
                    self.robot.arm.stop_controller()
                except Exception:  # noqa: BLE001 - none running
                    pass
                self._start_controller()
            except (SafetyViolation, Exception) as e:  # noqa: BLE001 - stays in FAULT, says why
                raise CommandError("recover_failed", str(e)) from None
            self.fault_reason = None
            self._transition(State.IDLE, "recover")
            return {"state": self.state.value}

    def _cmd_set_steering(self, task: str = "") -> dict:
        if task and ("/" in task or task.startswith(".")):
            raise CommandError("bad_field", "set_steering.task is a name, not a path")
        path = None
        if task:
            if not self.cfg.engine.steering_dir:
                raise CommandError("no_steering", "engine.steering_dir is not configured")
            path = Path(self.cfg.engine.steering_dir) / task
            if not path.exists():
                raise CommandError("no_steering", f"no steering delta for {task!r} at {path}")
        try:
            with self.engine_lock:  # between two inferences, never during one
                self.engine.set_steering(path)
        except Exception as e:  # noqa: BLE001 - a bad delta leaves the engine on its previous weights
            raise CommandError("steering_failed", f"{type(e).__name__}: {e}") from None
        self.steering = task or None
        log.info("steering: %s", task or "base model")
        return {"steering": self.steering}

    def _cmd_record(self, on: bool) -> dict:
        from edge_steer.runtime.recorder import Recorder
        with self._lock:
            if on and not self.recording:
                if self.recorder is None:
                    self.recorder = Recorder(self.cfg.record.dir, [c.name for c in self.cameras.cameras],
                                             self.cfg.record.image_size, self.cfg.rates.action_hz)
                self.recording = True
                if self.state in (State.RUNNING, State.PAUSED):
                    self.recorder.begin(self.instruction, {"episode": self.episode, **self._sim_meta()})
            elif not on and self.recording:
                if self.state in (State.RUNNING, State.PAUSED):
                    self._end_episode(None, "record_off")
                self.recording = False
            return {"recording": self.recording, "dir": str(self.cfg.record.dir)}

    def _cmd_shutdown(self) -> dict:
        self.shutdown_requested.set()
        return {"state": "shutting_down"}

    # ---- status and telemetry -------------------------------------------------------------------
    def _sim_success(self) -> bool | None:
        """The sim task's predicate; None on hardware, or when the sim robot cannot be read (it is gone)."""
        if self.robot.sim is None:
            return None
        try:
            return self.robot.sim.success()
        except Exception:  # noqa: BLE001 - the monitor faults on the same error, with its reason
            return None

    def _start_setpoint_loop(self) -> None:
        rt = self.cfg.realtime
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

    def robot_loop_timing(self) -> dict:
        """The robot process's 1 kHz loop (the sim twin's, or the arm's child); empty without one."""
        timing = getattr(self.robot.arm, "loop_timing", None)
        return self._timing.read("robot", timing) if timing is not None else {}

    def reset_loop_timing(self) -> None:
        """Start the 1 kHz loops' statistics afresh (benchmarks: so start-up is not measured)."""
        reset = getattr(self.robot.arm, "reset_loop_timing", None)
        if reset is not None:
            reset()
        self.setpoint.clear_timing()
        self._timing.clear()
        self.frame_to_policy_ms.clear()
        self.inference_ms.clear()

    def status(self) -> dict:
        r = self.reading
        out = {
            "state": self.state.value, "fault": self.fault_reason, "instruction": self.instruction,
            "episode": self.episode, "steering": self.steering, "recording": self.recording,
            "hold": self.setpoint.hold_reason, "segment": self.setpoint.segment,
            "chunks": self.chunks_made, "chunks_dropped": self.chunks_dropped,
            "inference_ms": self.inference_ms.summary(), "frame_to_policy_ms": self.frame_to_policy_ms.summary(),
            "setpoint_loop": self._timing.read("setpoint", self.setpoint.timing),
            "robot_loop": self.robot_loop_timing(), "telemetry_sent": self.telemetry_sent,
            "camera_errors": dict(self.cameras.errors), "engine": _jsonable(self.engine.metadata()),
            "transitions": list(self.transitions)[-10:], "uptime_s": time.time() - self.started_at,
        }
        if r is not None:
            out["tcp"] = [*map(float, r.position), *map(float, r.quat)]
            out["gripper_width"] = float(r.gripper_width)
        if self.recorder is not None:
            out["recorder"] = {"dir": str(self.recorder.root), "saved_episodes": self.recorder.saved_episodes,
                               "dropped": self.recorder.dropped, "error": self.recorder.last_error}
        if self.robot.sim is not None:
            out["sim"] = {"task": self.robot.sim.task.name, "success": self._sim_success()}
        return out

    def _telemetry(self) -> dict:
        r = self.reading
        p, q = self.setpoint.commanded
        self._telemetry_seq += 1
        msg = {"v": 1, "seq": self._telemetry_seq, "t": time.time(), "state": self.state.value,
               "hold": self.setpoint.hold_reason, "segment": self.setpoint.segment,
               "setpoint": [*p, *q], "chunks": self.chunks_made,
               "inference_ms": self.inference_ms.last, "missed_ticks": self.setpoint.missed_ticks}
        if r is not None:
            msg.update(tcp=[*map(float, r.position), *map(float, r.quat)], q=[float(x) for x in r.q],
                       gripper_width=float(r.gripper_width))
        if self.latest_chunk is not None:
            msg["chunk"] = self.latest_chunk.round(5).tolist()
        return msg

    # ---- threads ---------------------------------------------------------------------------------
    def _drain_executed(self) -> None:
        for seg, action in self.setpoint.take_executed():
            if self.recording and self.recorder is not None and self.state != State.FAULT:
                self.recorder.action(seg, action)

    def _monitor_loop(self) -> None:
        import zmq
        period = 1.0 / self.cfg.zmq.telemetry_hz
        pub = self.server.make_pub()
        next_t = time.perf_counter()
        last_ticks = -1
        last_notify = 0.0
        k = 0
        try:
            while self._running:
                k += 1
                try:
                    self._monitor_once(k)
                except Exception as e:  # noqa: BLE001 - a broken robot link is a fault, not a dead thread
                    if self.state != State.FAULT:
                        self.fault(f"monitor: {type(e).__name__}: {e}")
                try:
                    pub.send_multipart(encode_telemetry(self._telemetry()), flags=zmq.NOBLOCK)
                    self.telemetry_sent += 1
                except zmq.Again:
                    pass
                now = time.perf_counter()
                if now - last_notify > 1.0:  # systemd watchdog: only while the 1 kHz side is alive
                    ticks = self.setpoint.ticks
                    if ticks != last_ticks:
                        sdnotify.notify("WATCHDOG=1")
                    last_ticks, last_notify = ticks, now
                next_t += period
                delay = next_t - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                else:
                    next_t = time.perf_counter()
        finally:
            pass

    def _monitor_once(self, k: int) -> None:
        r = self.robot.read()
        self.reading = r
        self.setpoint.measured_p = r.position
        state = self.state
        reason = self.setpoint.take_fault()
        if reason is not None:  # raised on the 1 kHz side, handled here
            self.fault(reason)
            return
        if state != State.FAULT:
            reason = check_robot_errors(r.errors, r.mode)
            if reason:
                self.fault(reason, stop_controller=True)
                return
            reason = check_joints(r.q, self.joint_limits, self.cfg.safety.joint_margin, r.dq,
                                  self.cfg.safety.joint_velocity_share)
            if reason:
                self.fault(reason)
                return
        if state == State.RUNNING:
            v = check_watchdogs(self.cfg.safety, time.perf_counter(), self.cameras.oldest_age(),
                                self._running_since, self._last_chunk_at)
            if v.fault:
                self.fault(v.fault)
                return
            hr = self.setpoint.hold_reason
            if v.hold and hr is None:
                log.warning("hold: %s", v.hold)
                self.setpoint.hold_reason = "stale_frame"
            elif not v.hold and hr == "stale_frame":
                log.info("fresh frames again: resuming")
                self._last_chunk_at = time.perf_counter()  # the inference deadline restarts with the frames
                self.setpoint.hold_reason = None
            if (self.cfg.robot.stop_on_success and self.robot.sim is not None and k % 10 == 0
                    and self.success_latch.update(bool(self._sim_success()), time.perf_counter())):
                with self._lock:
                    if self.state == State.RUNNING:
                        self._transition(State.IDLE, "task_success")
                        self._end_episode(True, "success")
        self._drain_executed()

    def _observation(self, frames, r) -> dict[str, Any]:
        from edge_steer.contract import tcp_state
        from edge_steer.geometry import quat_to_mat
        obs: dict[str, Any] = {f"observation.images.{n}": f.image for n, f in frames.items()}
        obs["observation.state"] = tcp_state(r.position, quat_to_mat(r.quat), r.gripper_width)
        obs["observation.joints"] = r.q.astype(np.float32)
        # for engines that plan from the commanded target (the sim's expert); models ignore runtime.*
        p, q = self.setpoint.anchor
        obs["runtime.target"] = np.array([*p, *q])
        obs["runtime.episode"] = self.episode
        return obs

    def _policy_loop(self) -> None:
        sp = self.setpoint
        every = max(1, round(self.cfg.rates.action_hz / self.cfg.rates.policy_hz))
        stale_s = self.cfg.safety.stale_frame_ms / 1000.0
        deadline_s = self.cfg.safety.inference_deadline_ms / 1000.0
        seq = 0
        while self._running:
            if self.state != State.RUNNING or sp.hold_reason is not None:
                time.sleep(0.005)
                continue
            if not sp.wait_boundary(0.5):
                continue
            seg, t_b = sp.segment, sp.boundary_time
            if (seg - self._episode_start_seg) % every:
                continue
            frames = self.cameras.wait_fresh(after=t_b, timeout=stale_s)
            if frames is None or self.state != State.RUNNING:
                continue
            stamp = min(f.stamp for f in frames.values())
            self.frame_to_policy_ms.add((time.time() - stamp) * 1e3)
            episode, instruction = self.episode, self.instruction
            try:
                r = self.robot.read()
                obs = self._observation(frames, r)
                t0 = time.perf_counter()
                with self.engine_lock:
                    actions = self.engine.predict(obs, instruction)
                self.inference_ms.add((time.perf_counter() - t0) * 1e3)
                actions = np.asarray(actions, dtype=np.float64)
            except Exception as e:  # noqa: BLE001 - an engine that raises moves nothing
                self.fault(f"engine: {type(e).__name__}: {e}")
                continue
            if not is_finite_chunk(actions):
                self.fault(f"engine returned an invalid chunk (shape {actions.shape}, finite={np.isfinite(actions).all()})")
                continue
            if time.time() - stamp > deadline_s:
                self.chunks_dropped += 1
                log.warning("chunk dropped: %.0f ms from frame to chunk exceeds the inference deadline",
                            (time.time() - stamp) * 1e3)
                continue
            if self.state != State.RUNNING or episode != self.episode:
                continue  # paused, stopped or re-instructed while inferring
            seq += 1
            sp.inbox = Chunk(actions, seg, stamp, seq, posted=time.time())
            self._last_chunk_at = time.perf_counter()
            self.chunks_made += 1
            self.latest_chunk = actions
            if self.recording and self.recorder is not None:
                self.recorder.observation(seg, {k: v for k, v in obs.items() if k.startswith("observation.")})


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


class TimingWindow:
    def __init__(self, n: int = 2048):
        self.buf: deque[float] = deque(maxlen=n)
        self.last: float | None = None

    def add(self, x: float) -> None:
        self.buf.append(x)
        self.last = x

    def clear(self) -> None:
        self.buf.clear()

    def summary(self) -> dict:
        if not self.buf:
            return {}
        a = np.fromiter(self.buf, float)
        return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max()),
                "n": int(a.size)}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


class _TimingCache:
    """The loops' timing for `status`, read at most every `max_age_s`. Where the loops run in the robot
    process each read is a request the child answers on its next tick, one at a time; uncached, eight
    clients polling `status` queued e-stop's stop_controller behind their reads (e-stop p99 117 ms
    against 17 ms, tools/bench_reliability.py --motion process). A read that fails says why: status
    must answer even when the robot process is gone."""

    def __init__(self, max_age_s: float = 0.25):
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, dict]] = {}

    def read(self, name: str, timing) -> dict:
        now = time.perf_counter()
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None and now - hit[0] < self.max_age_s:
                return hit[1]
            try:
                value = timing()
            except Exception as e:  # noqa: BLE001
                value = {"error": f"{type(e).__name__}: {e}"}
            self._cache[name] = (now, value)
            return value

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
