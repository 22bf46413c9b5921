"""A robot owned by a child process, with its 1 kHz loop on its own interpreter: what the sim twin's
process (sim/panda_process.py) and the arm's (runtime/panda_process.py) share.

Why a process: a 1 kHz Python loop in the daemon waits for whichever thread holds the GIL (inference,
the cameras, ZMQ); in its own interpreter it waits for nothing but the scheduler (docs/serve.md). The
child owns the robot (the sim's physics, or the one libfranka connection the arm allows), and every
tick it (0) stops the controller if the parent's stop slot asks,
(1) answers the parent's requests, (2) ticks the setpoint stage when it runs here
(`realtime.motion = "process"`, runtime/motion.py), (3) hands the parent's latest controller target
on, (4) steps the backend and (5) publishes the robot's state. The parent side answers the narrow
panda-py surface the daemon uses (`RobotProcess`).

State and targets cross through seqlocked float64 arrays in one unnamed shared file (no syscalls on the
1 kHz path); requests go over a socket the child polls each tick. Stopping the controller (e-stop) has
its own slot in that file, so it never queues behind requests already on the socket. The child is a fresh interpreter
(`python -m <module> MEM_FD SOCK_FD`), not a multiprocessing child, so it never re-imports the caller's
main module or inherits its threads and EGL contexts.
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from edge_steer.sim.panda_model import Q_MAX, Q_MIN, Q_START   # Q_START: panda-py's default nullspace target

# libfranka's robot modes; an unknown one is published as "kOther"
MODES = ("kIdle", "kMove", "kReflex", "kGuiding", "kUserStopped", "kAutomaticErrorRecovery", "kOther")
ERR_BYTES = 2048
RPC_TIMEOUT_S = 3.0
START_TIMEOUT_S = 30.0
# Requests nobody waits for: the setpoint stage opens and closes the gripper from its 1 kHz tick, and a
# reply would hold that tick until the child's next one. Their arguments are checked before sending.
ONE_WAY = frozenset({"gripper"})
TARGET_SIZE = 3 + 14   # [seq, controller generation, kind (1 cartesian, 2 joint), up to 14 numbers]
STOP_SIZE = 3          # [stop request number (parent), last one done (child), 1 if it raised (child)]


# ----------------------------------------------------------------------------------------------
# Seqlocked blocks and the text inside them
# ----------------------------------------------------------------------------------------------
def seq_write(buf: np.ndarray, write) -> None:
    buf[0] += 1          # odd: readers retry
    write()
    buf[0] += 1


def seq_read(buf: np.ndarray, error: type[Exception] = RuntimeError) -> tuple[float, np.ndarray]:
    for _ in range(10_000):
        s0 = buf[0]
        if s0 % 2 == 0:
            snap = buf.copy()
            if buf[0] == s0:
                return s0, snap
        time.sleep(0)
    raise error("the shared robot state stays mid-write: the robot process is stuck")


def put_text(buf: np.ndarray, text: str) -> None:
    """Write `text` into a uint8 array as a 2-byte length and UTF-8 bytes (cut to fit)."""
    raw = text.encode()[:buf.size - 2]
    buf[:2] = np.frombuffer(len(raw).to_bytes(2, "little"), np.uint8)
    buf[2:2 + len(raw)] = np.frombuffer(raw, np.uint8)


def get_text(buf: np.ndarray) -> str:
    n = int.from_bytes(bytes(buf[:2]), "little")
    return bytes(buf[2:2 + n]).decode(errors="replace")


def error_list(errors: Any) -> list[str]:
    """A robot state's current errors as names: the sim's list, or libfranka's Errors (truthy when any
    flag is set, its str naming them)."""
    if isinstance(errors, list):
        return [str(e) for e in errors]
    return [str(errors)] if bool(errors) else []


def mode_name(mode: Any) -> str:
    """libfranka's RobotMode (an enum, or its str "RobotMode.kMove") or the sim's string, as "kMove"."""
    return str(getattr(mode, "name", mode)).split(".")[-1]


def mode_code(mode: Any) -> int:
    name = mode_name(mode)
    return MODES.index(name) if name in MODES else MODES.index("kOther")


@dataclass(frozen=True)
class StateLayout:
    """Offsets into the shared state array. [0] is the seqlock counter (odd while being written).
    `nq`/`nv`: the length of the extra qpos/qvel published after the arm's own (the sim publishes its
    whole world, for the parent's mirror; the arm none)."""
    nq: int = 0
    nv: int = 0
    time = 1
    mode = 2
    err_epoch = 3                  # bumped whenever the error list changes
    tcp = slice(4, 20)             # O_T_EE, column-major 4x4
    tau = slice(20, 27)
    q = slice(27, 34)
    dq = slice(34, 41)
    gripper = 41                   # finger width, m
    _head = 42

    @property
    def qpos(self) -> slice:
        return slice(self._head, self._head + self.nq)

    @property
    def qvel(self) -> slice:
        return slice(self._head + self.nq, self._head + self.nq + self.nv)

    @property
    def size(self) -> int:
        return self._head + self.nq + self.nv

    @property
    def nbytes(self) -> int:
        return (self.size + TARGET_SIZE + STOP_SIZE) * 8 + ERR_BYTES

    def buffers(self, mem) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The state, target, stop and error-text arrays, one after the other in the shared file."""
        state = np.frombuffer(mem, dtype=np.float64, count=self.size)
        target = np.frombuffer(mem, dtype=np.float64, count=TARGET_SIZE, offset=self.size * 8)
        stop = np.frombuffer(mem, dtype=np.float64, count=STOP_SIZE, offset=(self.size + TARGET_SIZE) * 8)
        err = np.frombuffer(mem, dtype=np.uint8, count=ERR_BYTES, offset=(self.size + TARGET_SIZE + STOP_SIZE) * 8)
        return state, target, stop, err


@dataclass
class Reading:
    """One tick's robot state, as the child publishes it."""
    time: float
    mode: int
    tcp: np.ndarray        # O_T_EE, column-major, 16
    tau: np.ndarray
    q: np.ndarray
    dq: np.ndarray
    gripper: float
    errors: list[str]


# ----------------------------------------------------------------------------------------------
# Child: the 1 kHz loop
# ----------------------------------------------------------------------------------------------
class RobotChild:
    """The child's loop around one robot backend. Subclasses connect the backend from the parent's
    hello message and fill in the hooks; `serve(mem_fd, conn_fd)` runs the loop until the parent closes
    it or goes away."""

    def __init__(self) -> None:
        self.stats = None
        self.motion = None
        self.active: dict[str, Any] = {"gen": 0.0, "ctrl": None, "seen": -1.0}
        self.running = True
        self._published_errors: tuple = ()
        self._stop_error = ""

    # ---- hooks -----------------------------------------------------------------------------------
    def connect(self, hello: tuple) -> StateLayout:
        """Open the backend from the parent's hello; returns the layout to publish in."""
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

    def request(self, op: str, args: tuple) -> Any:
        """Backend-specific requests."""
        raise ValueError(f"unknown request {op!r}")

    def controller_is_running(self, ctrl: Any) -> bool:
        return True

    def stage_controller(self, ctrl: Any) -> Any:
        """What the stage here calls set_control on for a started controller (the sim wraps it to record)."""
        return ctrl

    # ---- the loop ----------------------------------------------------------------------------------
    def serve(self, mem_fd: int, conn_fd: int) -> None:
        from edge_steer.realtime import LoopStats, make_realtime, run_periodic

        # Ctrl-C reaches the whole foreground group; the parent decides when the robot stops (it closes
        # us, or its end closes our socket), as libfranka's loop stops when its owner says so
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        conn = Connection(conn_fd)
        hello = conn.recv()
        self.stats = LoopStats()
        try:
            lay = self.connect(hello["backend"])
        except Exception as e:  # noqa: BLE001 - the parent raises it with the robot's name
            named = type(e).__name__ in ("RobotError", "ControlException")    # ours say what failed already
            conn.send(("failed", str(e) if named else f"{type(e).__name__}: {e}"))
            return
        mem = mmap.mmap(mem_fd, os.fstat(mem_fd).st_size)
        self.lay = lay
        self.state, self.target, self.stop_slot, self.err = lay.buffers(mem)
        rt_refused = make_realtime(threading.current_thread(), hello["rt_priority"], hello["cpu"])
        if hello["motion"] is not None:
            self.motion = self.motion_side(lay, mem, *hello["motion"])
        self.publish(self.read())
        conn.send(("ready", rt_refused))
        self.conn = conn
        try:
            run_periodic(self.tick, hello["period"], lambda: self.running, self.stats)
        except (EOFError, BrokenPipeError, ConnectionResetError):  # the parent went away
            pass
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Leave the robot safe when the loop ends."""

    def tick(self) -> None:
        stopped = self._stop_now() if self.stop_slot[0] != self.stop_slot[1] else None
        replies = []
        conn = self.conn
        while conn.poll():
            rid, *msg = conn.recv()
            try:
                reply = (rid, "ok", self.handle(msg[0], tuple(msg[1:])))
            except Exception as e:  # noqa: BLE001 - answered, the loop runs on
                reply = (rid, "error", type(e).__name__, str(e))
            if msg[0] not in ONE_WAY:
                replies.append(reply)
        if self.motion is not None:   # the motion generator first, then the controller (libfranka's order)
            self.motion.tick(self.state[self.lay.tcp][12:15])   # the last published pose: a tick old
        self.take_target()
        self.step()
        self.publish(self.read())
        if stopped is not None:     # as a reply: once the parent sees it, the published state shows the stop
            self.stop_slot[1] = stopped
        for reply in replies:   # after publishing: whoever gets the answer also sees its effect
            conn.send(reply)

    def handle(self, op: str, args: tuple) -> Any:
        from edge_steer.realtime import scheduling
        if op == "start":
            kind, params, gen = args
            ctrl = self.start_controller(kind, params)      # raises in reflex
            self.active.update(gen=gen, ctrl=ctrl, seen=-1.0)
            if self.motion is not None:               # the stage here drives it; the parent writes no targets
                self.motion.stage.controller = self.stage_controller(ctrl)
            return None
        if op == "stop_error":
            return self._stop_error
        if op == "recover":
            self.recover()
            return None
        if op == "timing":
            return self.stats.summary(), scheduling(threading.current_thread())
        if op == "reset_timing":
            self.stats.clear()
            return None
        if self.motion is not None and op.startswith("motion_"):
            return _motion_request(self.motion.stage, op, args)
        if op == "close":
            self.running = False
            return None
        return self.request(op, args)

    def _stop_now(self) -> float:
        """The parent's stop request, first in the tick so that it overtakes every request queued before
        it: no more targets reach the controller, whether or not the backend's stop raises (reported in
        the slot). Returns the request's number, acknowledged once the tick has published."""
        slot = self.stop_slot
        req = slot[0]
        self.active["ctrl"] = None
        if self.motion is not None:
            self.motion.stage.controller = None
        try:
            self.stop_controller()
            slot[2] = 0.0
        except Exception as e:  # noqa: BLE001 - reported to the parent, the loop runs on
            self._stop_error = f"{type(e).__name__}: {e}"
            slot[2] = 1.0
        return req

    def take_target(self) -> None:
        """The parent's latest set_control, handed to the running controller (libfranka's latest value)."""
        active, target = self.active, self.target
        ctrl = active["ctrl"]
        if ctrl is None or not self.controller_is_running(ctrl):
            return
        s0 = target[0]
        if s0 == active["seen"] or s0 % 2:
            return
        snap = target.copy()
        if target[0] != s0 or snap[1] != active["gen"]:
            return
        active["seen"] = s0
        v = snap[3:]
        if snap[2] == 1:
            ctrl.set_control(v[:3], v[3:7], v[7:14])
        else:
            ctrl.set_control(v[:7], v[7:14])

    def publish(self, r: Reading) -> None:
        state, lay, err = self.state, self.lay, self.err
        errors = tuple(r.errors)

        def write():
            state[lay.time] = r.time
            state[lay.mode] = r.mode
            state[lay.tcp] = r.tcp
            state[lay.tau] = r.tau
            state[lay.q] = r.q
            state[lay.dq] = r.dq
            state[lay.gripper] = r.gripper
            self.publish_extra(state)
            if errors != self._published_errors:
                put_text(err, "\n".join(errors))
                self._published_errors = errors
                state[lay.err_epoch] += 1
        seq_write(state, write)

    def motion_side(self, lay: StateLayout, mem, rates, safety, gripper_command, q_nullspace):
        """The setpoint stage in this process (runtime/motion.py), ticked by this loop."""
        from edge_steer.runtime.motion import MotionLayout, MotionSide
        from edge_steer.runtime.safety import SafetyFilter
        from edge_steer.runtime.setpoint import SetpointStage

        stage = SetpointStage(rates, SafetyFilter(safety, 1.0 / rates.control_hz), gripper_command)
        stage.q_nullspace = np.asarray(q_nullspace, dtype=float)
        stage.attach(threading.current_thread(), self.stats)
        return MotionSide(stage, MotionLayout(lay.nbytes), mem)


def _motion_request(stage, op: str, args: tuple):
    if op == "motion_reset":
        stage.reset(*args)
        return None
    if op == "motion_timing":
        t = stage.timing()
        t["scheduling"] = f"{t['scheduling']} (in the robot's loop, own process)"
        return t
    if op == "motion_clear_timing":
        stage.latencies.clear()
        stage.handovers.clear()
        return None
    raise ValueError(f"unknown request {op!r}")


# ----------------------------------------------------------------------------------------------
# Parent: the robot the daemon talks to
# ----------------------------------------------------------------------------------------------
def check_vec(x, n: int, name: str) -> np.ndarray:
    """`x` as n finite floats (a copy: the control loop must not see later edits), or ValueError."""
    a = np.array(x, dtype=float).reshape(-1)
    if a.shape != (n,):
        raise ValueError(f"{name} must have {n} elements, got shape {np.shape(x)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf: {a}")
    return a


class RemoteController:
    """The parent's handle on a controller that runs in the child. set_control only writes the target."""
    kind = ""

    def __init__(self, params: dict):
        self._params = params
        self._robot: RobotProcess | None = None
        self._gen = 0.0
        self._pending: np.ndarray | None = None

    def _write(self, values: np.ndarray) -> None:
        robot = self._robot
        if robot is None:   # not started yet: kept for the start, as panda-py keeps it
            self._pending = values
            return
        buf = robot._target

        def write():
            buf[1] = self._gen
            buf[2] = 1 if self.kind == "cartesian" else 2
            buf[3:3 + values.size] = values
        with robot._target_lock:
            seq_write(buf, write)


# panda-py's defaults (panda_py.controllers), which the sim's controllers mirror
DEFAULT_IMPEDANCE = np.diag([600.0, 600.0, 600.0, 30.0, 30.0, 30.0])
DEFAULT_STIFFNESS = np.array([600.0, 600.0, 600.0, 600.0, 250.0, 150.0, 50.0])
DEFAULT_DAMPING = np.array([50.0, 50.0, 50.0, 20.0, 20.0, 20.0, 10.0])


class RemoteCartesianImpedance(RemoteController):
    """panda_py.controllers.CartesianImpedance, run by a RobotProcess's child."""
    kind = "cartesian"

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

    def __init__(self, stiffness: np.ndarray = DEFAULT_STIFFNESS, damping: np.ndarray = DEFAULT_DAMPING,
                 filter_coeff: float = 1.0):
        super().__init__({"stiffness": check_vec(stiffness, 7, "stiffness"), "damping": check_vec(damping, 7, "damping"),
                          "filter_coeff": float(filter_coeff)})

    def set_control(self, position: np.ndarray, velocity: np.ndarray = np.zeros(7)) -> None:
        self._write(np.concatenate([check_vec(position, 7, "position"), check_vec(velocity, 7, "velocity")]))


def _child_env() -> dict[str, str]:
    # 7x7 linear algebra: BLAS worker threads would only wake up and contend with the 1 kHz loop
    return {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class RobotState:
    """libfranka's RobotState, the fields the daemon reads (the sim's, and a robot process's parent)."""
    q: np.ndarray
    dq: np.ndarray
    tau_J: np.ndarray
    O_T_EE: list[float]          # column-major 4x4, as libfranka
    time: float
    robot_mode: str = "kIdle"     # kIdle | kMove | kReflex | ...
    current_errors: list[str] = field(default_factory=list)


class PandaQueries:
    """The read-only part of panda_py.Panda that follows from `get_pose` / `get_state`; shared by
    SimPanda and the robot processes' parent side."""

    def get_pose(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_state(self) -> RobotState:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_position(self) -> np.ndarray:
        return self.get_pose()[:3, 3].copy()

    def get_orientation(self, scalar_first: bool = False) -> np.ndarray:
        from edge_steer.geometry import mat_to_quat
        quat = mat_to_quat(self.get_pose()[:3, :3])
        return np.roll(quat, 1) if scalar_first else quat

    def get_joint_limits_lower(self) -> np.ndarray:
        return Q_MIN.copy()

    def get_joint_limits_upper(self) -> np.ndarray:
        return Q_MAX.copy()

    def is_moving(self) -> bool:
        return bool(np.linalg.norm(self.get_state().dq) > 1e-3)


class RobotProcess(PandaQueries):
    """The parent's side of a robot run by a child process (`module`, a RobotChild's `serve`).
    `Error`: what a failed request, a dead child or a fault raises (panda-py raises libfranka's
    ControlException; the sim its twin)."""

    Error: type[Exception] = RuntimeError
    what = "the robot process"
    start_hint = ""
    realtime = True

    def _spawn(self, module: str, lay: StateLayout, backend: Any, rt_priority: int, cpu: int,
               motion: tuple | None, period: float = 0.001) -> None:
        """Start the child. `motion`: (RatesConfig, SafetyConfig, ...) for the stage beside its loop;
        `self.motion` is then the daemon's handle on it (runtime/motion.py)."""
        from edge_steer.runtime.motion import MotionLayout, RemoteSetpoint
        self._lay = lay
        motion_lay = MotionLayout(lay.nbytes) if motion is not None else None
        nbytes = lay.nbytes + (motion_lay.nbytes if motion_lay is not None else 0)
        # one unnamed shared file: nothing to clean up, whichever way either process ends
        if hasattr(os, "memfd_create"):
            mem_fd = os.memfd_create("edge-steer-robot")
        else:  # pragma: no cover - non-Linux
            mem_fd = os.dup(tempfile.TemporaryFile().fileno())
        os.ftruncate(mem_fd, nbytes)
        self._mem = mmap.mmap(mem_fd, nbytes)
        self._state, self._target, self._stop, self._err = lay.buffers(self._mem)
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
        self._conn.send({"backend": backend, "rt_priority": rt_priority, "cpu": cpu, "motion": motion, "period": period})
        if not self._conn.poll(START_TIMEOUT_S):
            self._proc.kill()
            self._proc.wait()
            raise self.Error(f"{self.what} did not start within {START_TIMEOUT_S:.0f} s{self.start_hint}")
        try:
            ready = self._conn.recv()
        except EOFError:
            raise self.Error(f"{self.what} exited at start (code {self._proc.wait()})") from None
        if ready[0] == "failed":
            self._proc.wait(timeout=5.0)
            self._conn.close()
            raise self.Error(f"{self.what}: {ready[1]}")
        self.rt_refused: str | None = ready[1]   # why its loop is not SCHED_FIFO, if it is not
        self.motion = RemoteSetpoint(self, motion_lay, self._mem) if motion_lay is not None else None

    # --- plumbing --------------------------------------------------------------------------------
    def _alive(self) -> None:
        code = self._proc.poll()
        if code is not None:
            raise self.Error(f"{self.what} exited (code {code})")

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _rpc(self, *msg):
        self._alive()
        try:
            if msg[0] in ONE_WAY:
                return self._send((0, *msg))
            with self._rpc_lock:
                self._rid += 1
                self._send((self._rid, *msg))
                deadline = time.monotonic() + RPC_TIMEOUT_S
                while True:   # a reply that came after its caller gave up is dropped here, not taken as ours
                    if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                        raise self.Error(f"{self.what} did not answer {msg[0]!r} within {RPC_TIMEOUT_S} s")
                    reply = self._conn.recv()
                    if reply[0] == self._rid:
                        break
        except (EOFError, OSError) as e:
            raise self.Error(f"lost {self.what}: {e!r}") from None
        if reply[1] == "error":
            raise (self.Error if reply[2] in ("ControlException", self.Error.__name__) else RuntimeError)(reply[3])
        return reply[2]

    def _snapshot(self) -> tuple[float, np.ndarray]:
        self._alive()
        return seq_read(self._state, self.Error)

    def _current_errors(self, snap: np.ndarray) -> list[str]:
        epoch = snap[self._lay.err_epoch]
        if epoch != self._err_epoch:
            while True:   # the text and its epoch are written in one seqlocked update
                s0 = self._state[0]
                text = get_text(self._err)
                if s0 % 2 == 0 and self._state[0] == s0:
                    break
                time.sleep(0)
            self._errors = [e for e in text.split("\n") if e]
            self._err_epoch = epoch
        return list(self._errors)

    def _make_state(self, s: np.ndarray) -> Any:
        lay = self._lay
        return RobotState(q=s[lay.q].copy(), dq=s[lay.dq].copy(), tau_J=s[lay.tau].copy(), O_T_EE=s[lay.tcp].tolist(),
                          time=float(s[lay.time]), robot_mode=MODES[int(s[lay.mode])],
                          current_errors=self._current_errors(s))

    # --- panda_py.Panda API (the daemon's subset) -----------------------------------------------
    def get_state(self) -> Any:
        return self._make_state(self._snapshot()[1])

    def get_pose(self) -> np.ndarray:
        return np.asarray(self.get_state().O_T_EE).reshape(4, 4, order="F")

    @property
    def q(self) -> np.ndarray:
        return self.get_state().q

    def raise_error(self) -> None:
        errors = self.get_state().current_errors
        if errors:
            raise self.Error(f"Motion aborted by reflex! [{', '.join(errors)}]")

    def start_controller(self, controller: RemoteController) -> None:
        if not isinstance(controller, RemoteController):
            raise TypeError(f"start_controller expects a Remote* controller, got {type(controller).__name__}")
        self._gen += 1
        self._rpc("start", controller.kind, controller._params, self._gen)
        controller._robot, controller._gen = self, self._gen
        if controller._pending is not None:
            controller._write(controller._pending)

    def stop_controller(self) -> None:
        """Through the stop slot, not the request socket: done on the child's next tick, before any
        request in flight (a status read, a timing read) is answered."""
        self._alive()
        slot = self._stop
        with self._stop_lock:
            req = slot[0] + 1
            slot[0] = req          # one aligned float64: the child sees the old number or this one
            deadline = time.monotonic() + RPC_TIMEOUT_S
            polls = 0
            while slot[1] != req:
                polls += 1
                if polls % 50 == 0:   # every ~10 ms: a dead child raises now, not at the deadline
                    self._alive()
                if time.monotonic() > deadline:
                    raise self.Error(f"{self.what} did not stop its controller within {RPC_TIMEOUT_S} s")
                time.sleep(0.0002)
            failed = bool(slot[2])
        if failed:   # the controller gets no more targets either way; the backend's reason, asked after
            raise self.Error(f"{self.what}: stop_controller failed: {self._rpc('stop_error')}")

    def recover(self) -> None:
        self._rpc("recover")

    # --- the loop's statistics -------------------------------------------------------------------
    def loop_timing(self) -> dict:
        stats, sched = self._rpc("timing")
        return {**stats, "scheduling": f"{sched} (own process)"} if stats else {}

    def reset_loop_timing(self) -> None:
        self._rpc("reset_timing")

    # --- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._rpc("close")
                self._proc.wait(timeout=2.0)
            except (self.Error, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait(timeout=2.0)
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
