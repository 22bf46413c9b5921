"""The robot process's child: the 1 kHz loop around one robot backend, on its own interpreter.

Why a process: a 1 kHz Python loop in the daemon waits for whichever thread holds the GIL (inference,
the cameras, ZMQ); in its own interpreter it waits for nothing but the scheduler (docs/serve.md). The
child owns the robot (the sim's physics, or the one libfranka connection the arm allows), and every
tick it (0) stops the controller if the parent's stop slot asks, (1) answers the parent's requests,
(2) ticks the setpoint stage (runtime/motion.py), (3) hands the parent's latest controller target on,
(4) steps the backend and (5) publishes the robot's state (runtime/shm.py). It is the one owner of the
stage's 1 kHz loop. Backends subclass RobotChild and fill in the hooks; test instrumentation plugs in
through Hello.hooks (`add_handler`, `wrap_controller`), never in a backend.

The child is a fresh interpreter (`python -m <backend module> MEM_FD SOCK_FD`), not a multiprocessing
child, so it never re-imports the caller's main module or inherits its threads and EGL contexts. It
imports neither torch nor MuJoCo unless its backend does (tests/test_lean_imports.py).
"""

from __future__ import annotations

import importlib
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

import numpy as np

from edge_steer.runtime import messages as m
from edge_steer.runtime.shm import CARTESIAN, ROBOT, STOP, TARGET, RobotLayout, map_file, put_text, seq_write


@dataclass
class Reading:
    """One tick's robot state, as the child publishes it."""
    time: float
    mode: int              # libfranka's RobotMode value
    tcp: np.ndarray        # O_T_EE, column-major, 16
    tau: np.ndarray
    q: np.ndarray
    dq: np.ndarray
    gripper: float
    errors: list[str]


class RobotChild:
    """`serve(mem_fd, conn_fd)` runs the loop until the parent closes it or goes away."""

    def __init__(self) -> None:
        self.stats = None
        self.motion = None                  # the stage's shared-memory side, when it runs here
        self._gen = 0.0                     # the running controller's generation
        self._ctrl = None                   # ... and the controller
        self._seen = -1.0                   # the last target sequence number handed on
        self.running = True
        self._published_errors: tuple = ()
        self._stop_error = ""
        self._handlers: dict[type, Callable[[Any], Any]] = {}
        self._wrappers: list[Callable[[Any], Any]] = []

    # ---- the backend's hooks ------------------------------------------------------------------------
    def connect(self, backend: Any) -> RobotLayout:
        """Open the backend from the parent's description; returns the layout to publish in."""
        raise NotImplementedError

    def start_controller(self, kind: str, params: dict) -> Any:
        raise NotImplementedError

    def stop_controller(self) -> None:
        raise NotImplementedError

    def recover(self) -> None:
        raise NotImplementedError

    def step(self) -> None:
        """The backend's work each tick after the target hand-over (the sim's physics; none for libfranka)."""

    def read(self) -> Reading:
        raise NotImplementedError

    def publish_extra(self, state: np.ndarray) -> None:
        """Write the layout's extra qpos/qvel (inside the seqlocked update)."""

    def controller_is_running(self, ctrl: Any) -> bool:
        return True

    def gripper_command(self) -> Callable[[bool], None]:
        """The non-blocking open/close the stage here calls (a GripperDriver's `command`)."""
        raise NotImplementedError

    def default_nullspace(self) -> np.ndarray:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Leave the robot safe when the loop ends."""

    # ---- what a harness hook may add -------------------------------------------------------------
    def add_handler(self, kind: type, handler: Callable[[Any], Any]) -> None:
        """Answer requests of message type `kind` with `handler(request)`."""
        self._handlers[kind] = handler

    def wrap_controller(self, wrap: Callable[[Any], Any]) -> None:
        """Have the stage drive `wrap(controller)` instead of each started controller (the running one too)."""
        self._wrappers.append(wrap)
        if self.motion is not None and self.motion.stage.controller is not None:
            self.motion.stage.controller = wrap(self.motion.stage.controller)

    # ---- the loop ------------------------------------------------------------------------------------
    def serve(self, mem_fd: int, conn_fd: int) -> None:
        from edge_steer.realtime import LoopStats, make_realtime, run_periodic

        # Ctrl-C reaches the whole foreground group; the parent decides when the robot stops (it closes
        # us, or its end closes our socket), as libfranka's loop stops when its owner says so
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        conn = Connection(conn_fd)
        hello: m.Hello = conn.recv()
        self.stats = LoopStats()
        try:
            lay = self.connect(hello.backend)
        except Exception as e:  # noqa: BLE001 - the parent raises it with the robot's name
            named = type(e).__name__ in ("RobotError", "ControlException")    # ours say what failed already
            conn.send(m.Failed(str(e) if named else f"{type(e).__name__}: {e}"))
            return
        mem = map_file(mem_fd)
        self.lay = lay
        self.state, self.target, self.stop_slot, self.err = lay.buffers(mem)
        rt_refused = make_realtime(threading.current_thread(), hello.rt_priority, hello.cpu)
        if hello.motion is not None:
            self.motion = self._motion_side(lay, mem, hello.motion)
        for hook in hello.hooks:
            module, _, name = hook.partition(":")
            getattr(importlib.import_module(module), name)(self)
        self.publish(self.read())
        conn.send(m.Ready(rt_refused))
        self.conn = conn
        try:
            run_periodic(self.tick, hello.period, lambda: self.running, self.stats)
        except (EOFError, BrokenPipeError, ConnectionResetError):  # the parent went away
            pass
        finally:
            self.shutdown()

    def tick(self) -> None:
        stopped = self._stop_now() if self.stop_slot[STOP.seq] != self.stop_slot[STOP.done] else None
        replies = []
        conn = self.conn
        while conn.poll():
            env: m.Envelope = conn.recv()
            try:
                reply = m.Reply(env.rid, self.handle(env.body))
            except Exception as e:  # noqa: BLE001 - answered, the loop runs on
                reply = m.Reply(env.rid, error=(type(e).__name__, str(e)))
            if env.rid:
                replies.append(reply)
        if self.motion is not None:   # the motion generator first, then the controller (libfranka's order)
            self.motion.tick(self.state[ROBOT.tcp][12:15])   # the last published pose: a tick old
        self.take_target()
        self.step()
        self.publish(self.read())
        if stopped is not None:     # as a reply: once the parent sees it, the published state shows the stop
            self.stop_slot[STOP.done] = stopped
        for reply in replies:   # after publishing: whoever gets the answer also sees its effect
            conn.send(reply)

    def handle(self, req: Any) -> Any:
        from edge_steer.realtime import scheduling
        if isinstance(req, m.StartController):
            ctrl = self.start_controller(req.kind, req.params)      # raises in reflex
            self._gen, self._ctrl, self._seen = req.gen, ctrl, -1.0
            if self.motion is not None:               # the stage here drives it; the parent writes no targets
                for wrap in self._wrappers:
                    ctrl = wrap(ctrl)
                self.motion.stage.controller = ctrl
            return None
        if isinstance(req, m.StopError):
            return self._stop_error
        if isinstance(req, m.Recover):
            return self.recover()
        if isinstance(req, m.Timing):
            return self.stats.summary(), scheduling(threading.current_thread())
        if isinstance(req, m.ResetTiming):
            return self.stats.clear()
        if isinstance(req, m.Gripper):
            return self.gripper_command()(req.close)
        if isinstance(req, (m.MotionReset, m.MotionTiming, m.MotionClearTiming)):
            if self.motion is None:
                raise ValueError("the setpoint stage does not run in this robot process")
            return self.motion.request(req)
        if isinstance(req, m.Close):
            self.running = False
            return None
        handler = self._handlers.get(type(req))
        if handler is None:
            raise ValueError(f"unknown request {type(req).__name__}")
        return handler(req)

    def _stop_now(self) -> float:
        """The parent's stop request, first in the tick so that it overtakes every request queued before
        it: no more targets reach the controller, whether or not the backend's stop raises (reported in
        the slot). Returns the request's number, acknowledged once the tick has published."""
        slot = self.stop_slot
        req = slot[STOP.seq]
        self._ctrl = None
        if self.motion is not None:
            self.motion.stage.controller = None
        try:
            self.stop_controller()
            slot[STOP.failed] = 0.0
        except Exception as e:  # noqa: BLE001 - reported to the parent, the loop runs on
            self._stop_error = f"{type(e).__name__}: {e}"
            slot[STOP.failed] = 1.0
        return req

    def take_target(self) -> None:
        """The parent's latest set_control, handed to the running controller (libfranka's latest value)."""
        ctrl, target = self._ctrl, self.target
        if ctrl is None or not self.controller_is_running(ctrl):
            return
        s0 = target[TARGET.seq]
        if s0 == self._seen or s0 % 2:
            return
        snap = target.copy()
        if target[TARGET.seq] != s0 or snap[TARGET.gen] != self._gen:
            return
        self._seen = s0
        v = snap[TARGET.values]
        if snap[TARGET.kind] == CARTESIAN:
            ctrl.set_control(v[:3], v[3:7], v[7:14])
        else:
            ctrl.set_control(v[:7], v[7:14])

    def publish(self, r: Reading) -> None:
        state, err = self.state, self.err
        errors = tuple(r.errors)

        def write():
            state[ROBOT.time] = r.time
            state[ROBOT.mode] = r.mode
            state[ROBOT.tcp] = r.tcp
            state[ROBOT.tau] = r.tau
            state[ROBOT.q] = r.q
            state[ROBOT.dq] = r.dq
            state[ROBOT.gripper] = r.gripper
            self.publish_extra(state)
            if errors != self._published_errors:
                put_text(err, "\n".join(errors))
                self._published_errors = errors
                state[ROBOT.err_epoch] += 1
        seq_write(state, write)

    def _motion_side(self, lay: RobotLayout, mem, spec: m.MotionSpec):
        """The setpoint stage in this process (runtime/motion.py), ticked by this loop."""
        from edge_steer.runtime.motion import MotionSide
        from edge_steer.runtime.safety import SafetyFilter
        from edge_steer.runtime.setpoint import SetpointStage
        from edge_steer.runtime.shm import MotionLayout

        stage = SetpointStage(spec.rates, SafetyFilter(spec.safety, 1.0 / spec.rates.control_hz), self.gripper_command())
        q_null = self.default_nullspace() if spec.q_nullspace is None else spec.q_nullspace
        stage.q_nullspace = np.asarray(q_null, dtype=float)
        stage.attach(threading.current_thread(), self.stats)
        return MotionSide(stage, MotionLayout(lay.nbytes), mem)
