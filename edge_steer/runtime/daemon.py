"""The daemon: the stages wired together around the state machine, and its lifetime.

Each part owns one thing and talks to the others through a narrow interface:
  statemachine.py  the states, the events and the effects of each step (pure: no I/O, no threads)
  plant.py         robot + cameras + setpoint port, opened, started and closed together
  policy.py        thread "policy": engine at the policy rate on fresh frames -> the setpoint port
  monitor.py       thread "monitor": robot state, watchdogs, sim success, recording hand-off, telemetry PUB
  commands.py      one handler per protocol command                   (called by server.CommandServer)
  telemetry.py     the telemetry message, timing windows
This module applies the state machine's steps: it performs their effects on the plant, the recorder
and the stages, in the order the step lists them, under one lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from edge_steer.runtime import sdnotify
from edge_steer.runtime.commands import CommandHandlers
from edge_steer.runtime.config import ConfigError, ServeConfig
from edge_steer.runtime.monitor import Monitor
from edge_steer.runtime.plant import Plant, open_plant
from edge_steer.runtime.policy import Episode, PolicyStage
from edge_steer.runtime.protocol import Request
from edge_steer.runtime.robot import RobotHandle
from edge_steer.runtime.statemachine import Effect, Event, Machine, Refused, State, Step, hold_for, step
from edge_steer.runtime.telemetry import TimingCache, jsonable, telemetry_message

log = logging.getLogger("edge_steer.serve")


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
        self.cfg = cfg
        self.plant: Plant = open_plant(cfg, robot, cameras)
        try:
            self.engine = engine if engine is not None else build_engine(cfg, self.plant.robot)
        except BaseException:
            self.plant.close()
            raise
        self.engine_lock = threading.Lock()
        self._lock = threading.RLock()
        sim = self.plant.sim is not None and self.plant.owned
        self.machine = Machine(sim=sim, fresh_scene=sim and cfg.robot.fresh_scene)
        self.transitions: deque[dict] = deque(maxlen=50)
        self.steering: str | None = None
        self.recording = False
        self.recorder = None
        self.reading = None
        self.running_since: float | None = None
        self._episode: Episode | None = None          # what the policy stage drives; None outside RUNNING
        self._episode_start_seg = 0
        self._paused_at_seg = 0
        self._timing = TimingCache()
        self._telemetry_seq = 0
        self.policy = PolicyStage(cfg, self.engine, self.engine_lock, lambda: self._episode, self.fault,
                                  self._record_observation)
        self.handlers = CommandHandlers(self, cfg.engine.steering_dir)
        self.monitor: Monitor | None = None
        self.shutdown_requested = threading.Event()
        self._stopped = False
        self.server = None
        self.started_at = time.time()

    # ---- what callers read (tests, benchmarks, status) ------------------------------------------
    robot = property(lambda self: self.plant.robot)
    cameras = property(lambda self: self.plant.cameras)
    setpoint = property(lambda self: self.plant.setpoint)
    state = property(lambda self: self.machine.state)
    instruction = property(lambda self: self.machine.instruction)
    episode = property(lambda self: self.machine.episode)
    fault_reason = property(lambda self: self.machine.fault)

    # ---- lifetime ------------------------------------------------------------------------------
    def start(self) -> "Daemon":
        from edge_steer.runtime.server import CommandServer
        try:
            self.reading = self.plant.start_controller()
            self.policy.warm_up()
            self.plant.start_loops(self.cfg)
            self.server = CommandServer(self.cfg.zmq, self)
            self.server.start()
        except BaseException:
            self.close()
            raise
        self.monitor = Monitor(self.cfg, self, self.server.make_pub())
        self.policy.start()
        self.monitor.start()
        log.info("serving: state IDLE, commands on %s, telemetry on %s", self.cfg.zmq.command, self.cfg.zmq.telemetry)
        sdnotify.notify("READY=1\nSTATUS=IDLE")
        return self

    def close(self) -> None:
        """Stop everything: hold, commit any recording, close sockets and devices. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        sdnotify.notify("STOPPING=1")
        with self._lock:
            self._perform(step(self.machine, Event.SHUTDOWN), Event.SHUTDOWN)
        self.setpoint.hold_reason = "shutdown"
        self.policy.stop()
        if self.monitor is not None:
            self.monitor.stop()
        if self.server is not None:
            self.server.stop()
        time.sleep(0.05)  # let the hold settle a few ticks before the setter stops
        if self.recorder is not None:
            self.recorder.close()
        self.plant.close()
        log.info("stopped")

    # ---- the state machine's steps ----------------------------------------------------------------
    def apply(self, event: Event, **kwargs: Any) -> dict:
        """Take one step (Refused if the machine refuses it) and return {"state": ...}."""
        if event == Event.ESTOP:
            self.fault("estop", stop_controller=True, event=Event.ESTOP)
        else:
            with self._lock:
                self._perform(step(self.machine, event, **kwargs), event)
        return {"state": self.machine.state.value}

    def fault(self, reason: str, stop_controller: bool = False, event: Event = Event.FAULT) -> None:
        """Any thread: hold (or drop the controller: e-stop, robot errors) and latch FAULT until `recover`.
        The controller and the hold go first, before the lock another command may hold."""
        if stop_controller:
            self._stop_controller()
        self.setpoint.hold_reason = "fault"
        with self._lock:
            st = step(self.machine, event, reason=reason)
            self._perform(st, event, controller_stopped=stop_controller)
        if st.changed:
            log.error("FAULT: %s", reason)

    def _perform(self, st: Step, event: Event, controller_stopped: bool = False) -> None:
        """The step's effects in order, then the new machine. An effect that raises Refused leaves the
        machine as it was (recover that fails stays in FAULT)."""
        old, new = self.machine, st.machine
        if st.changed and new.state != State.RUNNING and Effect.RESTART_CONTROLLER not in st.effects:
            self.setpoint.hold_reason = hold_for(new.state)      # motion stops before the bookkeeping
        for effect in st.effects:
            if effect == Effect.STOP_CONTROLLER:
                if not controller_stopped:
                    self._stop_controller()
            elif effect == Effect.RESTART_CONTROLLER:
                self._restart_controller()
            elif effect == Effect.ABORT_EPISODE:
                if self.recording and self.recorder is not None:
                    self.recorder.abort(st.why)
            elif effect == Effect.END_EPISODE:
                success = st.success if st.success is not None or event != Event.STOP else self.sim_success()
                self._end_episode(success, {Event.INSTRUCT: "new_instruction", Event.TASK_SUCCESS: "success"}
                                  .get(event, event.value))
            elif effect == Effect.HOLD_HERE:
                self._paused_at_seg = self.setpoint.segment
                self.plant.hold_here()
            elif effect == Effect.FRESH_SCENE:
                self._fresh_scene(self.cfg.robot.seed + new.scene)
            elif effect == Effect.BEGIN_EPISODE:
                self._episode_start_seg = self.setpoint.segment
                if self.monitor is not None:
                    self.monitor.success_latch.reset()   # a new instruction's episode earns its own success
                if self.recording:
                    self.recorder.begin(new.instruction, {"episode": new.episode, **self._sim_meta()})
            elif effect == Effect.RESUME_EPISODE:
                self._episode_start_seg += self.setpoint.segment - self._paused_at_seg
        self.machine = new
        if st.changed:
            self.transitions.append({"t": time.time(), "from": old.state.value, "to": new.state.value, "why": st.why})
            log.info("state %s -> %s (%s)", old.state.value, new.state.value, st.why)
            self.running_since = time.perf_counter() if new.state == State.RUNNING else None
            if self.monitor is not None:
                self.monitor.success_latch.reset()
            self.setpoint.hold_reason = hold_for(new.state)
            sdnotify.notify(f"STATUS={new.state.value}")
        if new.instruction != old.instruction:
            log.info("instruction: %r", new.instruction)
        if st.changed or st.effects:
            self._episode = (Episode(new.episode, new.instruction, self.plant, self._episode_start_seg)
                             if new.state == State.RUNNING else None)

    def _stop_controller(self) -> None:
        try:
            self.plant.stop_controller()
        except Exception as e:  # noqa: BLE001
            log.error("stop_controller failed: %s", e)

    def _restart_controller(self) -> None:
        arm = self.robot.arm
        try:
            arm.recover()
            self.setpoint.controller = None
            try:
                arm.stop_controller()
            except Exception:  # noqa: BLE001 - none running
                pass
            self.reading = self.plant.start_controller()
        except Exception as e:  # noqa: BLE001 - stays in FAULT, says why
            raise Refused("recover_failed", str(e)) from None

    def _fresh_scene(self, seed: int) -> None:
        """Sim: close the cell and open it again on scene `seed`. The old one closes first: its 1 kHz
        physics and rendering would otherwise compete with the new one's start for the same cores. The
        monitor is held off meanwhile (its lock); if the new scene cannot be opened the old seed's is."""
        log.info("fresh sim scene: seed %d", seed)
        with self.monitor.lock if self.monitor is not None else threading.Lock():
            self.plant.close()
            try:
                self.plant = self._open_started(seed)
            except Exception as e:  # noqa: BLE001 - back to a scene that opened before, then say why
                self.plant = self._open_started(self.plant.seed)
                raise Refused("scene_failed", f"cannot open a fresh scene (seed {seed}): {type(e).__name__}: {e}") from None
            finally:
                if getattr(self.engine, "backend", "") == "expert":   # it plans from the cell's privileged state
                    with self.engine_lock:
                        self.engine.cell = self.plant.sim

    def _open_started(self, seed: int | None) -> Plant:
        plant = open_plant(self.cfg, seed=seed)
        try:
            self.reading = plant.start_controller()
            plant.start_loops(self.cfg)
        except BaseException:
            plant.close()
            raise
        return plant

    def _end_episode(self, success: bool | None, reason: str) -> None:
        if self.recording and self.recorder is not None:
            self.drain_executed()
            self.recorder.end(success, reason)

    def _sim_meta(self) -> dict:
        cell = self.plant.sim
        return {"task_name": cell.task.name, "seed": self.plant.seed} if cell is not None else {}

    def _record_observation(self, seg: int, obs: dict) -> None:
        if self.recording and self.recorder is not None:
            self.recorder.observation(seg, {k: v for k, v in obs.items() if k.startswith("observation.")})

    # ---- what the command handlers call (commands.CommandHost) ----------------------------------
    def handle(self, req: Request) -> dict[str, Any]:
        return self.handlers.handle(req)

    def set_steering(self, path: Path | None, name: str | None) -> None:
        try:
            with self.engine_lock:  # between two inferences, never during one
                self.engine.set_steering(path)
        except Exception as e:  # noqa: BLE001 - a bad delta leaves the engine on its previous weights
            raise Refused("steering_failed", f"{type(e).__name__}: {e}") from None
        self.steering = name
        log.info("steering: %s", name or "base model")

    def set_recording(self, on: bool) -> dict:
        from edge_steer.runtime.recorder import Recorder
        live = self.machine.state in (State.RUNNING, State.PAUSED)
        with self._lock:
            if on and not self.recording:
                if self.recorder is None:
                    self.recorder = Recorder(self.cfg.record.dir, [c.name for c in self.cameras.cameras],
                                             self.cfg.record.image_size, self.cfg.rates.action_hz)
                self.recording = True
                if live:
                    self.recorder.begin(self.instruction, {"episode": self.episode, **self._sim_meta()})
            elif not on and self.recording:
                if live:
                    self._end_episode(None, "record_off")
                self.recording = False
            return {"recording": self.recording, "dir": str(self.cfg.record.dir)}

    def scene(self) -> dict:
        """Sim: the scene's task, seed and number ({} on hardware)."""
        cell = self.plant.sim
        return {"task": cell.task.name, "seed": self.plant.seed, "scene": self.machine.scene} if cell else {}

    def request_shutdown(self) -> None:
        self.shutdown_requested.set()

    # ---- what the monitor calls (monitor.MonitorHost) -------------------------------------------
    def last_chunk_at(self) -> float | None:
        return self.policy.last_chunk_at

    def restart_inference_deadline(self) -> None:
        self.policy.last_chunk_at = time.perf_counter()

    def task_success(self) -> None:
        with self._lock:
            self._perform(step(self.machine, Event.TASK_SUCCESS), Event.TASK_SUCCESS)

    def sim_success(self) -> bool | None:
        """The sim task's predicate; None on hardware, or when the sim robot cannot be read (it is gone)."""
        if self.plant.sim is None:
            return None
        try:
            return self.plant.sim.success()
        except Exception:  # noqa: BLE001 - the monitor faults on the same error, with its reason
            return None

    def drain_executed(self) -> None:
        for seg, action in self.setpoint.take_executed():
            if self.recording and self.recorder is not None and self.machine.state != State.FAULT:
                self.recorder.action(seg, action)

    def telemetry(self) -> dict:
        self._telemetry_seq += 1
        return telemetry_message(self._telemetry_seq, self.machine.state.value, self.setpoint, self.reading,
                                 self.policy.latest_chunk, self.policy.chunks_made, self.policy.inference_ms.last)

    # ---- status and timing ------------------------------------------------------------------------
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
        self.policy.clear_timing()

    def status(self) -> dict:
        r, m, pol = self.reading, self.machine, self.policy
        out = {
            "state": m.state.value, "fault": m.fault, "instruction": m.instruction,
            "episode": m.episode, "steering": self.steering, "recording": self.recording,
            "hold": self.setpoint.hold_reason, "segment": self.setpoint.segment,
            "chunks": pol.chunks_made, "chunks_dropped": pol.chunks_dropped,
            "inference_ms": pol.inference_ms.summary(), "frame_to_policy_ms": pol.frame_to_policy_ms.summary(),
            "setpoint_loop": self._timing.read("setpoint", self.setpoint.timing),
            "robot_loop": self.robot_loop_timing(),
            "telemetry_sent": self.monitor.telemetry_sent if self.monitor is not None else 0,
            "camera_errors": dict(self.cameras.errors), "engine": jsonable(self.engine.metadata()),
            "transitions": list(self.transitions)[-10:], "uptime_s": time.time() - self.started_at,
        }
        if r is not None:
            out["tcp"] = [*map(float, r.position), *map(float, r.quat)]
            out["gripper_width"] = float(r.gripper_width)
        if self.recorder is not None:
            out["recorder"] = {"dir": str(self.recorder.root), "saved_episodes": self.recorder.saved_episodes,
                               "dropped": self.recorder.dropped, "error": self.recorder.last_error}
        if self.plant.sim is not None:
            out["sim"] = {**self.scene(), "success": self.sim_success()}
        return out
