"""SimPanda's 1 kHz loop in its own process: the sim's stand-in for libfranka's C++ control loop.

On the robot, libfranka's loop is C++ and never waits for Python's GIL; an in-process SimPanda thread
is 100-180 us of Python per tick that takes the GIL from inference, the cameras and the setpoint
stage 1000 times a second (docs/serve.md). Here the physics and the torque controller run in a child
process with their own interpreter, at SCHED_FIFO 20 as libfranka's loop, and the daemon's side keeps
the narrow panda-py surface it uses:

* `SimPandaProcess`: get_state / get_position / get_orientation / start_controller / stop_controller /
  recover / raise_error, plus the side door `SimGripper` drives the fingers through;
* `RemoteCartesianImpedance` / `RemoteJointPosition`: `set_control` checks its arguments here and
  writes the target to shared memory, where the child's next tick picks it up (libfranka's
  latest-value hand-over);
* a mirror `World` posed from the child's state whenever someone takes its lock (cameras, the task's
  success predicate, the scripted expert), so everything that reads the scene reads it as before.

State and targets cross through seqlocked arrays in one shared memory file (no syscalls on the 1 kHz
path); requests (start, stop, recover, gripper, timing) go over a socket the child polls every tick.
The child is a fresh interpreter (`python -m edge_steer.sim.panda_process`), not a multiprocessing
child, so it never re-imports the caller's main module or inherits its threads and EGL contexts.
"""

from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from edge_steer.realtime import LIBFRANKA_PRIORITY
from edge_steer.sim.panda import (_DEFAULT_DAMPING, _DEFAULT_IMPEDANCE, _DEFAULT_STIFFNESS, DT, ControlException,
                                  PandaQueries, SimRobotState, _vec)
from edge_steer.sim.panda_model import Q_START
from edge_steer.sim.scene import SceneSpec
from edge_steer.sim.world import World

MODES = ("kIdle", "kMove", "kReflex")
ERR_BYTES = 2048
RPC_TIMEOUT_S = 3.0
# Requests nobody waits for: the setpoint stage opens and closes the gripper from its 1 kHz tick, and a
# reply would hold that tick until the child's next one. Their arguments are checked before sending.
ONE_WAY = frozenset({"gripper"})
_TARGET_SIZE = 3 + 14   # [seq, controller generation, kind (1 cartesian, 2 joint), up to 14 numbers]


@dataclass(frozen=True)
class _Layout:
    """Offsets into the shared state array. [0] is the seqlock counter (odd while being written)."""
    nq: int
    nv: int
    time = 1
    mode = 2
    err_epoch = 3                  # bumped whenever the error list changes
    tcp = slice(4, 20)             # O_T_EE, column-major 4x4
    tau = slice(20, 27)

    @property
    def qpos(self) -> slice:
        return slice(27, 27 + self.nq)

    @property
    def qvel(self) -> slice:
        return slice(27 + self.nq, 27 + self.nq + self.nv)

    @property
    def size(self) -> int:
        return 27 + self.nq + self.nv

    @property
    def nbytes(self) -> int:
        return (self.size + _TARGET_SIZE) * 8 + ERR_BYTES

    def buffers(self, mem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The state, target and error-text arrays, one after the other in the shared file."""
        state = np.frombuffer(mem, dtype=np.float64, count=self.size)
        target = np.frombuffer(mem, dtype=np.float64, count=_TARGET_SIZE, offset=self.size * 8)
        err = np.frombuffer(mem, dtype=np.uint8, count=ERR_BYTES, offset=(self.size + _TARGET_SIZE) * 8)
        return state, target, err


def _seq_write(buf: np.ndarray, write) -> None:
    buf[0] += 1          # odd: readers retry
    write()
    buf[0] += 1


def _put_text(buf: np.ndarray, text: str) -> None:
    """Write `text` into a uint8 array as a 2-byte length and UTF-8 bytes (cut to fit)."""
    raw = text.encode()[:buf.size - 2]
    buf[:2] = np.frombuffer(len(raw).to_bytes(2, "little"), np.uint8)
    buf[2:2 + len(raw)] = np.frombuffer(raw, np.uint8)


def _get_text(buf: np.ndarray) -> str:
    n = int.from_bytes(bytes(buf[:2]), "little")
    return bytes(buf[2:2 + n]).decode(errors="replace")


def _seq_read(buf: np.ndarray) -> tuple[float, np.ndarray]:
    for _ in range(10_000):
        s0 = buf[0]
        if s0 % 2 == 0:
            snap = buf.copy()
            if buf[0] == s0:
                return s0, snap
        time.sleep(0)
    raise ControlException("the shared robot state stays mid-write: the simulated robot process is stuck")


# ----------------------------------------------------------------------------------------------
# Child: the 1 kHz loop
# ----------------------------------------------------------------------------------------------
def _child_main(mem_fd: int, conn_fd: int) -> None:
    from edge_steer.realtime import LoopStats, make_realtime, run_periodic, scheduling
    from edge_steer.sim.panda import CartesianImpedance, JointPosition, SimPanda

    import signal
    # Ctrl-C reaches the whole foreground group; the parent decides when the robot stops (it closes us,
    # or its end closes our socket), as libfranka's loop stops when its owner says so
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(conn_fd)
    spec, q0, finger, rt_priority, cpu, motion_cfg = conn.recv()
    world = World(spec)
    world.reset(q0, finger)
    panda = SimPanda(world, realtime=False)   # physics + controller; this process's loop ticks it
    lay = _Layout(world.model.nq, world.model.nv)
    mem = mmap.mmap(mem_fd, os.fstat(mem_fd).st_size)
    state, target, err = lay.buffers(mem)
    stats = LoopStats()
    rt_refused = make_realtime(threading.current_thread(), rt_priority, cpu)
    motion = None if motion_cfg is None else _motion_side(panda, lay, mem, stats, *motion_cfg)
    active = {"gen": 0.0, "ctrl": None, "seen": -1.0}
    published_errors: list[tuple] = [()]
    running = [True]
    pose = np.eye(4)

    def publish() -> None:
        pos, rot = world.tcp_pose()
        pose[:3, :3], pose[:3, 3] = rot, pos
        errors = panda._errors
        mode = 2 if errors else (1 if panda._controller is not None else 0)

        def write():
            state[lay.time] = world.time
            state[lay.mode] = mode
            state[lay.tcp] = pose.ravel(order="F")
            state[lay.tau] = world.data.actuator_force[:7]
            state[lay.qpos] = world.data.qpos
            state[lay.qvel] = world.data.qvel
            if tuple(errors) != published_errors[0]:
                _put_text(err, "\n".join(errors))
                published_errors[0] = tuple(errors)
                state[lay.err_epoch] += 1
        _seq_write(state, write)

    def take_target() -> None:
        ctrl = active["ctrl"]
        if ctrl is None or panda._controller is not ctrl:
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

    def handle(msg) -> object:
        op, args = msg[0], msg[1:]
        if op == "start":
            kind, params, gen = args
            ctrl = CartesianImpedance(**params) if kind == "cartesian" else JointPosition(**params)
            panda.start_controller(ctrl)         # raises ControlException in reflex
            active.update(gen=gen, ctrl=ctrl, seen=-1.0)
            if motion is not None:               # the stage here drives it; the parent writes no targets
                motion.stage.controller = ctrl
            return None
        if op == "stop":
            panda.stop_controller()
            active["ctrl"] = None
            if motion is not None:
                motion.stage.controller = None
            return None
        if op == "recover":
            panda.recover()
            return None
        if op == "gripper":
            panda._gripper_set(*args)
            return None
        if op == "fault":
            panda.inject_fault(*args)
            return None
        if op == "timing":
            return stats.summary(), scheduling(threading.current_thread())
        if op == "reset_timing":
            stats.clear()
            return None
        if motion is not None and op.startswith("motion_"):
            return _motion_request(motion.stage, op, args)
        if op == "close":
            running[0] = False
            return None
        raise ValueError(f"unknown request {op!r}")

    def tick() -> None:
        replies = []
        while conn.poll():
            rid, *msg = conn.recv()
            try:
                reply = (rid, "ok", handle(msg))
            except Exception as e:  # noqa: BLE001 - answered, the loop runs on
                reply = (rid, "error", type(e).__name__, str(e))
            if msg[0] not in ONE_WAY:
                replies.append(reply)
        if motion is not None:   # the motion generator first, then the controller and physics (libfranka's order)
            motion.tick(pose[:3, 3])
        take_target()
        panda._locked_tick()   # SimPanda's own loop body: a tick that raises faults the arm, never the loop
        publish()
        for reply in replies:   # after publishing: whoever gets the answer also sees its effect
            conn.send(reply)

    publish()
    conn.send(("ready", rt_refused))
    try:
        run_periodic(tick, DT, lambda: running[0], stats)
    except (EOFError, BrokenPipeError, ConnectionResetError):  # the parent went away
        pass


def _motion_side(panda, lay: _Layout, mem, stats, rates, safety, grasp_force: float, q_nullspace):
    """The setpoint stage in this process (runtime/motion.py), ticked by this loop."""
    from edge_steer.runtime.motion import MotionLayout, MotionSide
    from edge_steer.runtime.robot import GripperDriver
    from edge_steer.runtime.safety import SafetyFilter
    from edge_steer.runtime.setpoint import SetpointStage
    from edge_steer.sim.panda import SimGripper

    stage = SetpointStage(rates, SafetyFilter(safety, 1.0 / rates.control_hz),
                          GripperDriver(SimGripper(panda), grasp_force, asynchronous=True).command)
    stage.q_nullspace = np.asarray(q_nullspace, dtype=float)
    stage.attach(threading.current_thread(), stats)
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
class _RemoteController:
    """The parent's handle on a controller that runs in the child. set_control only writes the target."""
    kind = ""

    def __init__(self, params: dict):
        self._params = params
        self._robot: SimPandaProcess | None = None
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
            _seq_write(buf, write)


class RemoteCartesianImpedance(_RemoteController):
    """panda_py.controllers.CartesianImpedance, run by SimPandaProcess's child."""
    kind = "cartesian"

    def __init__(self, impedance: np.ndarray = _DEFAULT_IMPEDANCE, damping_ratio: float = 1.0,
                 nullspace_stiffness: float = 0.5, filter_coeff: float = 1.0):
        k = np.asarray(impedance, dtype=float)
        if k.shape != (6, 6):
            raise ValueError(f"impedance must be 6x6, got {k.shape}")
        super().__init__({"impedance": k, "damping_ratio": float(damping_ratio),
                          "nullspace_stiffness": float(nullspace_stiffness), "filter_coeff": float(filter_coeff)})

    def set_control(self, position: np.ndarray, orientation: np.ndarray, q_nullspace: np.ndarray = Q_START) -> None:
        x = _vec(position, 3, "position")
        quat = _vec(orientation, 4, "orientation")
        if abs(np.linalg.norm(quat) - 1.0) > 1e-3:
            raise ValueError(f"orientation must be a unit quaternion (x, y, z, w), norm={np.linalg.norm(quat):.4f}")
        self._write(np.concatenate([x, quat, _vec(q_nullspace, 7, "q_nullspace")]))


class RemoteJointPosition(_RemoteController):
    """panda_py.controllers.JointPosition, run by SimPandaProcess's child."""
    kind = "joint"

    def __init__(self, stiffness: np.ndarray = _DEFAULT_STIFFNESS, damping: np.ndarray = _DEFAULT_DAMPING,
                 filter_coeff: float = 1.0):
        super().__init__({"stiffness": _vec(stiffness, 7, "stiffness"), "damping": _vec(damping, 7, "damping"),
                          "filter_coeff": float(filter_coeff)})

    def set_control(self, position: np.ndarray, velocity: np.ndarray = np.zeros(7)) -> None:
        self._write(np.concatenate([_vec(position, 7, "position"), _vec(velocity, 7, "velocity")]))


class _MirrorLock:
    """The mirror world's lock: whoever takes it first (not re-entrantly) sees the newest physics."""

    def __init__(self, refresh):
        self._lock = threading.RLock()
        self._depth = 0
        self._refresh = refresh

    def __enter__(self):
        self._lock.acquire()
        self._depth += 1
        if self._depth == 1:
            try:
                self._refresh()
            except BaseException:
                self._depth -= 1
                self._lock.release()
                raise
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        self._lock.release()


def _child_env() -> dict[str, str]:
    # 7x7 linear algebra: BLAS worker threads would only wake up and contend with the 1 kHz loop
    return {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class SimPandaProcess(PandaQueries):
    """SimPanda with its 1 kHz loop in a child process. `world` is the mirror the parent's readers use."""

    realtime = True

    def __init__(self, spec: SceneSpec, q0: np.ndarray = Q_START, finger: float = 0.04,
                 rt_priority: int = LIBFRANKA_PRIORITY, cpu: int = -1, name: str = "panda",
                 motion: tuple | None = None):
        """`motion`: (RatesConfig, SafetyConfig, grasp force, q_nullspace) to run the setpoint stage in the
        child's loop; `self.motion` is then the daemon's handle on it (runtime/motion.py)."""
        from edge_steer.runtime.motion import MotionLayout
        self.name = name
        self.world = World(spec)
        self.world.reset(q0, finger)
        self._lay = _Layout(self.world.model.nq, self.world.model.nv)
        motion_lay = MotionLayout(self._lay.nbytes) if motion is not None else None
        nbytes = self._lay.nbytes + (motion_lay.nbytes if motion_lay is not None else 0)
        # one unnamed shared file: nothing to clean up, whichever way either process ends
        if hasattr(os, "memfd_create"):
            mem_fd = os.memfd_create("edge-steer-simpanda")
        else:  # pragma: no cover - non-Linux
            mem_fd = os.dup(tempfile.TemporaryFile().fileno())
        os.ftruncate(mem_fd, nbytes)
        self._mem = mmap.mmap(mem_fd, nbytes)
        self._state, self._target, self._err = self._lay.buffers(self._mem)
        self._target_lock = threading.Lock()
        self._rpc_lock = threading.Lock()    # one request in flight at a time, replies in order
        self._send_lock = threading.Lock()   # one message on the socket at a time
        self._gen = 0.0
        self._rid = 0
        self._err_epoch = -1.0
        self._errors: list[str] = []
        self._mirror_seq = -1.0
        ours, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "edge_steer.sim.panda_process", str(mem_fd), str(theirs.fileno())],
                pass_fds=(mem_fd, theirs.fileno()), stdin=subprocess.DEVNULL, env=_child_env())
        finally:
            os.close(mem_fd)
            theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send((spec, np.asarray(q0, float), float(finger), rt_priority, cpu, motion))
        self.world.lock = _MirrorLock(self._refresh_mirror)
        if not self._conn.poll(30.0):
            self._proc.kill()
            raise ControlException("the simulated robot process did not start within 30 s")
        try:
            ready = self._conn.recv()
        except EOFError:
            raise ControlException(f"the simulated robot process exited at start (code {self._proc.wait()})") from None
        self.rt_refused: str | None = ready[1]   # why its loop is not SCHED_FIFO, if it is not
        self.motion = None
        if motion_lay is not None:
            from edge_steer.runtime.motion import RemoteSetpoint
            self.motion = RemoteSetpoint(self, motion_lay, self._mem)

    # --- plumbing --------------------------------------------------------------------------------
    def _alive(self) -> None:
        code = self._proc.poll()
        if code is not None:
            raise ControlException(f"the simulated robot process exited (code {code})")

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
                        raise ControlException(f"the simulated robot did not answer {msg[0]!r} within {RPC_TIMEOUT_S} s")
                    reply = self._conn.recv()
                    if reply[0] == self._rid:
                        break
        except (EOFError, OSError) as e:
            raise ControlException(f"lost the simulated robot process: {e!r}") from None
        if reply[1] == "error":
            raise (ControlException if reply[2] == "ControlException" else RuntimeError)(reply[3])
        return reply[2]

    def _snapshot(self) -> tuple[float, np.ndarray]:
        self._alive()
        return _seq_read(self._state)

    def _refresh_mirror(self) -> None:
        import mujoco
        seq, snap = self._snapshot()
        if seq == self._mirror_seq:
            return
        d, lay = self.world.data, self._lay
        d.time = snap[lay.time]
        d.qpos[:] = snap[lay.qpos]
        d.qvel[:] = snap[lay.qvel]
        mujoco.mj_forward(self.world.model, d)
        self._mirror_seq = seq

    def _current_errors(self, snap: np.ndarray) -> list[str]:
        epoch = snap[self._lay.err_epoch]
        if epoch != self._err_epoch:
            while True:   # the text and its epoch are written in one seqlocked update
                s0 = self._state[0]
                text = _get_text(self._err)
                if s0 % 2 == 0 and self._state[0] == s0:
                    break
                time.sleep(0)
            self._errors = [e for e in text.split("\n") if e]
            self._err_epoch = epoch
        return list(self._errors)

    # --- panda_py.Panda API (the daemon's subset) -----------------------------------------------
    def get_state(self) -> SimRobotState:
        s, lay = self._snapshot()[1], self._lay
        return SimRobotState(q=s[lay.qpos][self.world.qadr], dq=s[lay.qvel][self.world.vadr], tau_J=s[lay.tau].copy(),
                             O_T_EE=s[lay.tcp].tolist(), time=float(s[lay.time]), robot_mode=MODES[int(s[lay.mode])],
                             current_errors=self._current_errors(s))

    def get_pose(self) -> np.ndarray:
        return np.asarray(self.get_state().O_T_EE).reshape(4, 4, order="F")

    @property
    def q(self) -> np.ndarray:
        return self.get_state().q

    def raise_error(self) -> None:
        errors = self.get_state().current_errors
        if errors:
            raise ControlException(f"Motion aborted by reflex! [{', '.join(errors)}]")

    def start_controller(self, controller: _RemoteController) -> None:
        if not isinstance(controller, _RemoteController):
            raise TypeError(f"start_controller expects a Remote* controller, got {type(controller).__name__}")
        self._gen += 1
        self._rpc("start", controller.kind, controller._params, self._gen)
        controller._robot, controller._gen = self, self._gen
        if controller._pending is not None:
            controller._write(controller._pending)

    def stop_controller(self) -> None:
        self._rpc("stop")

    def recover(self) -> None:
        self._rpc("recover")

    def inject_fault(self, error: str = "communication_constraints_violation") -> None:
        """Sim only: make the next control tick fault as the real robot's reflexes would."""
        self._rpc("fault", error)

    # --- the fingers (SimGripper's side door) -----------------------------------------------------
    def _gripper_reading(self) -> tuple[float, float]:
        s, lay = self._snapshot()[1], self._lay
        return float(s[lay.qpos][self.world.f_qadr].sum()), float(s[lay.time])

    def _gripper_set(self, width: float, speed: float, force: float, grasping: bool) -> None:
        self._rpc("gripper", float(width), float(speed), float(force), bool(grasping))

    def _clock(self) -> float:
        return time.perf_counter()

    def _wait_until(self, t: float) -> None:
        time.sleep(max(0.0, t - time.perf_counter()))

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
            except (ControlException, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait(timeout=2.0)
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    _child_main(int(sys.argv[1]), int(sys.argv[2]))
