"""The daemon's side of a robot run by a child process (runtime/robot_child.py): `RobotProcess` answers
the part of `panda_py.Panda` the daemon uses from the state the child publishes in the shared file
(runtime/shm.py) and sends it typed requests (runtime/messages.py); `RemoteCartesianImpedance` and
`RemoteJointPosition` are panda-py's controllers as handles that only write the target block.

Backends (sim/panda_process.py, runtime/panda_process.py) subclass RobotProcess with their child's module
and Hello; they and anyone else use its public methods (`request`, `snapshot`, `layout`), not its slots.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from edge_steer.franka.arm import DEFAULT_DAMPING, DEFAULT_IMPEDANCE, DEFAULT_STIFFNESS, Q_START
from edge_steer.franka.queries import PandaQueries
from edge_steer.franka.types import RobotMode, RobotState, check_vec
from edge_steer.runtime import messages as m
from edge_steer.runtime.shm import (CARTESIAN, JOINT, ROBOT, STOP, TARGET, MotionLayout, RobotLayout, get_text,
                                    map_file, seq_read, seq_write, shared_file)

RPC_TIMEOUT_S = 3.0
START_TIMEOUT_S = 30.0


class RemoteController:
    """The parent's handle on a controller that runs in the child. set_control only writes the target."""
    kind = ""
    code = 0.0

    def __init__(self, params: dict):
        self.params = params
        self._robot: RobotProcess | None = None
        self._gen = 0.0
        self._pending: np.ndarray | None = None

    def attach(self, robot: "RobotProcess", gen: float) -> None:
        """Called by RobotProcess.start_controller: from now on targets go to `robot`'s target block."""
        self._robot, self._gen = robot, gen
        if self._pending is not None:
            self._write(self._pending)

    def _write(self, values: np.ndarray) -> None:
        robot = self._robot
        if robot is None:   # not started yet: kept for the start, as panda-py keeps it
            self._pending = values
            return
        robot.write_target(self._gen, self.code, values)


class RemoteCartesianImpedance(RemoteController):
    """panda_py.controllers.CartesianImpedance, run by a RobotProcess's child."""
    kind = "cartesian"
    code = CARTESIAN

    def __init__(self, impedance: np.ndarray = DEFAULT_IMPEDANCE, damping_ratio: float = 1.0,
                 nullspace_stiffness: float = 0.5, filter_coeff: float = 1.0):
        k = np.asarray(impedance, dtype=float)
        if k.shape != (6, 6):
            raise ValueError(f"impedance must be 6x6, got {k.shape}")
        super().__init__({"impedance": k, "damping_ratio": float(damping_ratio),
                          "nullspace_stiffness": float(nullspace_stiffness), "filter_coeff": float(filter_coeff)})

    def set_control(self, position: np.ndarray, orientation: np.ndarray, q_nullspace: np.ndarray = Q_START) -> None:
        x = check_vec(position, 3, "position")
        quat = check_vec(orientation, 4, "orientation")
        if abs(np.linalg.norm(quat) - 1.0) > 1e-3:
            raise ValueError(f"orientation must be a unit quaternion (x, y, z, w), norm={np.linalg.norm(quat):.4f}")
        self._write(np.concatenate([x, quat, check_vec(q_nullspace, 7, "q_nullspace")]))


class RemoteJointPosition(RemoteController):
    """panda_py.controllers.JointPosition, run by a RobotProcess's child."""
    kind = "joint"
    code = JOINT

    def __init__(self, stiffness: np.ndarray = DEFAULT_STIFFNESS, damping: np.ndarray = DEFAULT_DAMPING,
                 filter_coeff: float = 1.0):
        super().__init__({"stiffness": check_vec(stiffness, 7, "stiffness"), "damping": check_vec(damping, 7, "damping"),
                          "filter_coeff": float(filter_coeff)})

    def set_control(self, position: np.ndarray, velocity: np.ndarray = np.zeros(7)) -> None:
        self._write(np.concatenate([check_vec(position, 7, "position"), check_vec(velocity, 7, "velocity")]))


def _child_env() -> dict[str, str]:
    # 7x7 linear algebra: BLAS worker threads would only wake up and contend with the 1 kHz loop
    return {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class RobotProcess(PandaQueries):
    """The parent's side. `Error`: what a failed request, a dead child or a fault raises (panda-py raises
    libfranka's ControlException; the sim its twin)."""

    Error: type[Exception] = RuntimeError
    what = "the robot process"
    start_hint = ""

    def _spawn(self, module: str, layout: RobotLayout, hello: m.Hello) -> None:
        """Start the child (`python -m module`). With `hello.motion`, `self.motion` is then the daemon's
        handle on the setpoint stage there (runtime/motion.py)."""
        from edge_steer.runtime.motion import RemoteSetpoint
        self.layout = layout
        motion_lay = MotionLayout(layout.nbytes) if hello.motion is not None else None
        nbytes = layout.nbytes + (motion_lay.nbytes if motion_lay is not None else 0)
        mem_fd = shared_file(nbytes)
        self._mem = map_file(mem_fd)
        self._state, self._target, self._stop, self._err = layout.buffers(self._mem)
        self._target_lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._rpc_lock = threading.Lock()    # one request in flight at a time, replies in order
        self._send_lock = threading.Lock()   # one message on the socket at a time
        self._gen = 0.0
        self._rid = 0
        self._err_epoch = -1.0
        self._errors: list[str] = []
        ours, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", module, str(mem_fd), str(theirs.fileno())],
                                          pass_fds=(mem_fd, theirs.fileno()), stdin=subprocess.DEVNULL, env=_child_env())
        finally:
            os.close(mem_fd)
            theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send(hello)
        if not self._conn.poll(START_TIMEOUT_S):
            self._proc.kill()
            self._proc.wait()
            raise self.Error(f"{self.what} did not start within {START_TIMEOUT_S:.0f} s{self.start_hint}")
        try:
            ready = self._conn.recv()
        except EOFError:
            raise self.Error(f"{self.what} exited at start (code {self._proc.wait()})") from None
        if isinstance(ready, m.Failed):
            self._proc.wait(timeout=5.0)
            self._conn.close()
            raise self.Error(f"{self.what}: {ready.reason}")
        self.rt_refused: str | None = ready.rt_refused   # why its loop is not SCHED_FIFO, if it is not
        self.motion = RemoteSetpoint(self, motion_lay, self._mem) if motion_lay is not None else None

    # --- what backends and controllers use ------------------------------------------------------
    def _alive(self) -> None:
        code = self._proc.poll()
        if code is not None:
            raise self.Error(f"{self.what} exited (code {code})")

    def request(self, body: Any) -> Any:
        """Send one request to the child and return its answer (None at once for a one-way one)."""
        self._alive()
        try:
            if getattr(body, "one_way", False):
                with self._send_lock:
                    self._conn.send(m.Envelope(0, body))
                return None
            with self._rpc_lock:
                self._rid += 1
                with self._send_lock:
                    self._conn.send(m.Envelope(self._rid, body))
                deadline = time.monotonic() + RPC_TIMEOUT_S
                while True:   # a reply that came after its caller gave up is dropped here, not taken as ours
                    if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                        raise self.Error(f"{self.what} did not answer {type(body).__name__} within {RPC_TIMEOUT_S} s")
                    reply: m.Reply = self._conn.recv()
                    if reply.rid == self._rid:
                        break
        except (EOFError, OSError) as e:
            raise self.Error(f"lost {self.what}: {e!r}") from None
        if reply.error is not None:
            kind, text = reply.error
            raise (self.Error if kind in ("ControlException", self.Error.__name__) else RuntimeError)(text)
        return reply.value

    def snapshot(self) -> tuple[float, np.ndarray]:
        """(sequence number, a consistent copy of the state block); ROBOT and `layout` name its fields."""
        self._alive()
        return seq_read(self._state, self.Error)

    def write_target(self, gen: float, kind: float, values: np.ndarray) -> None:
        """The latest set_control of controller generation `gen` (older generations are ignored)."""
        buf = self._target

        def write():
            buf[TARGET.gen] = gen
            buf[TARGET.kind] = kind
            buf[TARGET.values.start:TARGET.values.start + values.size] = values
        with self._target_lock:
            seq_write(buf, write)

    def _current_errors(self, snap: np.ndarray) -> list[str]:
        epoch = snap[ROBOT.err_epoch]
        if epoch != self._err_epoch:
            while True:   # the text and its epoch are written in one seqlocked update
                s0 = self._state[ROBOT.seq]
                text = get_text(self._err)
                if s0 % 2 == 0 and self._state[ROBOT.seq] == s0:
                    break
                time.sleep(0)
            self._errors = [e for e in text.split("\n") if e]
            self._err_epoch = epoch
        return list(self._errors)

    # --- panda_py.Panda API (the daemon's subset) -----------------------------------------------
    def get_state(self) -> RobotState:
        s = self.snapshot()[1]
        return RobotState.make(s[ROBOT.q], s[ROBOT.dq], s[ROBOT.tau], s[ROBOT.tcp], float(s[ROBOT.time]),
                               RobotMode(int(s[ROBOT.mode])), self._current_errors(s))

    def get_pose(self) -> np.ndarray:
        return self.snapshot()[1][ROBOT.tcp].reshape(4, 4, order="F")

    @property
    def q(self) -> np.ndarray:
        return self.snapshot()[1][ROBOT.q].copy()

    def is_moving(self) -> bool:
        """panda-py's meaning: a controller is running (the child publishes kMove then)."""
        return int(self.snapshot()[1][ROBOT.mode]) == RobotMode.kMove.value

    def raise_error(self) -> None:
        errors = self._current_errors(self.snapshot()[1])
        if errors:
            raise self.Error(f"Motion aborted by reflex! [{', '.join(errors)}]")

    def start_controller(self, controller: RemoteController) -> None:
        if not isinstance(controller, RemoteController):
            raise TypeError(f"start_controller expects a Remote* controller, got {type(controller).__name__}")
        self._gen += 1
        self.request(m.StartController(controller.kind, controller.params, self._gen))
        controller.attach(self, self._gen)

    def stop_controller(self) -> None:
        """Through the stop slot, not the request socket: done on the child's next tick, before any
        request in flight (a status read, a timing read) is answered."""
        self._alive()
        slot = self._stop
        with self._stop_lock:
            req = slot[STOP.seq] + 1
            slot[STOP.seq] = req          # one aligned float64: the child sees the old number or this one
            deadline = time.monotonic() + RPC_TIMEOUT_S
            polls = 0
            while slot[STOP.done] != req:
                polls += 1
                if polls % 50 == 0:   # every ~10 ms: a dead child raises now, not at the deadline
                    self._alive()
                if time.monotonic() > deadline:
                    raise self.Error(f"{self.what} did not stop its controller within {RPC_TIMEOUT_S} s")
                time.sleep(0.0002)
            failed = bool(slot[STOP.failed])
        if failed:   # the controller gets no more targets either way; the backend's reason, asked after
            raise self.Error(f"{self.what}: stop_controller failed: {self.request(m.StopError())}")

    def recover(self) -> None:
        self.request(m.Recover())

    # --- the loop's statistics -------------------------------------------------------------------
    def loop_timing(self) -> dict:
        stats, sched = self.request(m.Timing())
        return {**stats, "scheduling": f"{sched} (own process)"} if stats else {}

    def reset_loop_timing(self) -> None:
        self.request(m.ResetTiming())

    # --- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self.request(m.Close())
                self._proc.wait(timeout=2.0)
            except (self.Error, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait(timeout=2.0)
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
