"""`SimPanda`: panda-py's API over the MuJoCo world.

The names, signatures, defaults, units and frames follow panda-py 1.1 (`panda_py.Panda`,
`panda_py.controllers`, `panda_py.libfranka.Gripper`), so code written against the `Robot`
protocol runs unchanged on the real arm. As on the real robot the controller runs in its own 1 kHz
loop while Python sets targets asynchronously:

* `realtime=True`: a thread paces physics to the wall clock (1 tick = 1 ms = one mj_step) and
  records its period error; `create_context(f).ok()` sleeps until the next period.
* `realtime=False`: no thread; physics advances only inside `ctx.ok()` and the blocking motion/
  gripper calls, as fast as the CPU allows (data generation and evaluation).

Gravity and Coriolis are compensated inside the robot (as the Panda's firmware does), so a
controller's torque is what panda-py's controllers compute on top of that.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from edge_steer.geometry import mat_to_quat, orientation_error, quat_to_mat, rotvec_to_mat
from edge_steer.runtime.robot_process import DEFAULT_DAMPING as _DEFAULT_DAMPING
from edge_steer.runtime.robot_process import DEFAULT_IMPEDANCE as _DEFAULT_IMPEDANCE
from edge_steer.runtime.robot_process import DEFAULT_STIFFNESS as _DEFAULT_STIFFNESS
from edge_steer.runtime.robot_process import PandaQueries
from edge_steer.runtime.robot_process import RobotState as SimRobotState
from edge_steer.runtime.robot_process import check_vec as _vec
from edge_steer.realtime import LIBFRANKA_PRIORITY, LoopStats, make_realtime, run_periodic, scheduling
from edge_steer.sim.panda_model import DQ_MAX, GRIPPER_MAX_WIDTH, Q_MAX, Q_MIN, Q_START, TAU_MAX
from edge_steer.sim.scene import SceneSpec
from edge_steer.sim.world import World

DT = 0.001


class ControlException(RuntimeError):
    """Raised like libfranka's ControlException when the 1 kHz loop faulted (reflex)."""


# ----------------------------------------------------------------------------------------------
# Controllers (panda_py.controllers)
# ----------------------------------------------------------------------------------------------
class TorqueController:
    """Base of panda-py's controllers: `get_time()` is seconds since `start_controller`."""

    def __init__(self, filter_coeff: float = 1.0):
        self._filter = float(filter_coeff)
        self._lock = threading.Lock()
        self._t0: float | None = None
        self._now = 0.0

    def get_time(self) -> float:
        return 0.0 if self._t0 is None else self._now - self._t0

    def set_filter(self, filter_coeff: float) -> None:
        if not 0.0 < filter_coeff <= 1.0:
            raise ValueError("filter_coeff must be in (0, 1]")
        self._filter = float(filter_coeff)

    # called by SimPanda on the control thread
    def _start(self, world: World) -> None:
        self._t0 = self._now = world.time

    def _torque(self, world: World) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


_Q_LO, _Q_HI = Q_MIN - 0.01, Q_MAX + 0.01   # the reflex's margin past the joint limits


class CartesianImpedance(TorqueController):
    """Cartesian impedance with nullspace joint attractor, as panda_py.controllers.CartesianImpedance."""

    def __init__(self, impedance: np.ndarray = _DEFAULT_IMPEDANCE, damping_ratio: float = 1.0,
                 nullspace_stiffness: float = 0.5, filter_coeff: float = 1.0):
        super().__init__(filter_coeff)
        self._zeta = float(damping_ratio)
        self.set_impedance(impedance)
        self._kn = float(nullspace_stiffness)
        self._x_cmd: np.ndarray | None = None
        self._r_cmd: np.ndarray | None = None
        self._qn_cmd = Q_START.copy()
        self._x = self._r = self._qn = None  # filtered targets

    def set_impedance(self, impedance: np.ndarray) -> None:
        k = np.asarray(impedance, dtype=float)
        if k.shape != (6, 6):
            raise ValueError(f"impedance must be 6x6, got {k.shape}")
        self._k = k
        self._d = 2.0 * self._zeta * np.sqrt(np.diag(k))    # critical damping per axis, set once

    def set_damping_ratio(self, damping: float) -> None:
        self._zeta = float(damping)
        self._d = 2.0 * self._zeta * np.sqrt(np.diag(self._k))

    def set_nullspace_stiffness(self, nullspace_stiffness: float) -> None:
        self._kn = float(nullspace_stiffness)

    def set_control(self, position: np.ndarray, orientation: np.ndarray, q_nullspace: np.ndarray = Q_START) -> None:
        """Target TCP position (m, base frame), orientation (quaternion x, y, z, w), nullspace q."""
        x = _vec(position, 3, "position")
        quat = _vec(orientation, 4, "orientation")
        if abs(np.linalg.norm(quat) - 1.0) > 1e-3:
            raise ValueError(f"orientation must be a unit quaternion (x, y, z, w), norm={np.linalg.norm(quat):.4f}")
        qn = _vec(q_nullspace, 7, "q_nullspace")
        with self._lock:
            self._x_cmd, self._r_cmd, self._qn_cmd = x, quat_to_mat(quat), qn

    def _start(self, world: World) -> None:
        super()._start(world)
        x, r = world.tcp_pose()
        with self._lock:
            if self._x_cmd is None:  # hold the current pose until told otherwise
                self._x_cmd, self._r_cmd = x, r
        self._x, self._r, self._qn = x, r, world.q

    def _torque(self, world: World) -> np.ndarray:
        with self._lock:
            x_cmd, r_cmd, qn_cmd = self._x_cmd, self._r_cmd, self._qn_cmd
        a = self._filter
        self._x = a * x_cmd + (1 - a) * self._x
        self._r = r_cmd if a >= 1.0 else _blend_rot(self._r, r_cmd, a)
        self._qn = a * qn_cmd + (1 - a) * self._qn
        x, r = world.tcp_pose()
        jac = world.tcp_jacobian()
        dq = world.dq
        err = np.concatenate([x - self._x, -orientation_error(self._r, r)])
        wrench = -self._k @ err - self._d * (jac @ dq)
        # pinv's SVD is a third of this tick; a 6x6 solve would do, but changes the sim's trajectories in the
        # last digits, and with them every recorded demo and evaluation (they are reproduced bit for bit)
        jpinv_t = np.linalg.pinv(jac.T, rcond=1e-3)
        null = (np.eye(7) - jac.T @ jpinv_t) @ (self._kn * (self._qn - world.q) - 2.0 * np.sqrt(self._kn) * dq)
        return jac.T @ wrench + null


class JointPosition(TorqueController):
    """Joint impedance toward a target position/velocity, as panda_py.controllers.JointPosition."""

    def __init__(self, stiffness: np.ndarray = _DEFAULT_STIFFNESS, damping: np.ndarray = _DEFAULT_DAMPING,
                 filter_coeff: float = 1.0):
        super().__init__(filter_coeff)
        self.set_stiffness(stiffness)
        self.set_damping(damping)
        self._q_cmd: np.ndarray | None = None
        self._dq_cmd = np.zeros(7)
        self._q = None

    def set_stiffness(self, stiffness: np.ndarray) -> None:
        self._kp = _vec(stiffness, 7, "stiffness")

    def set_damping(self, damping: np.ndarray) -> None:
        self._kd = _vec(damping, 7, "damping")

    def set_control(self, position: np.ndarray, velocity: np.ndarray = np.zeros(7)) -> None:
        q = _vec(position, 7, "position")
        dq = _vec(velocity, 7, "velocity")
        with self._lock:
            self._q_cmd, self._dq_cmd = q, dq

    def _start(self, world: World) -> None:
        super()._start(world)
        with self._lock:
            if self._q_cmd is None:
                self._q_cmd = world.q
        self._q = world.q

    def _torque(self, world: World) -> np.ndarray:
        with self._lock:
            q_cmd, dq_cmd = self._q_cmd, self._dq_cmd
        self._q = self._filter * q_cmd + (1 - self._filter) * self._q
        return self._kp * (self._q - world.q) + self._kd * (dq_cmd - world.dq)


def _blend_rot(r0: np.ndarray, r1: np.ndarray, a: float) -> np.ndarray:
    return rotvec_to_mat(a * orientation_error(r1, r0)) @ r0


# ----------------------------------------------------------------------------------------------
# State (libfranka.RobotState subset) and context
# ----------------------------------------------------------------------------------------------
class SimPandaContext:
    """panda_py.PandaContext: `while ctx.ok():` runs at `frequency` Hz (sim time or wall time)."""

    def __init__(self, panda: "SimPanda", frequency: float, max_runtime: float = 0.0, max_iter: int = 0):
        if frequency <= 0 or frequency > 1000:
            raise ValueError("frequency must be in (0, 1000] Hz")
        self._panda, self._period = panda, 1.0 / frequency
        self._max_runtime, self._max_iter = max_runtime, max_iter
        self.num_ticks = 0
        self._t0 = panda._clock()
        self._next = self._t0

    @property
    def time(self) -> float:
        return self._panda._clock() - self._t0

    def ok(self) -> bool:
        p = self._panda
        if self.num_ticks > 0:
            self._next += self._period
            p._wait_until(self._next)
        p.raise_error()
        self.num_ticks += 1
        if self._max_iter and self.num_ticks > self._max_iter:
            return False
        if self._max_runtime and self.time > self._max_runtime:
            return False
        return True


# ----------------------------------------------------------------------------------------------
# The robot
# ----------------------------------------------------------------------------------------------
class SimPanda(PandaQueries):
    """panda_py.Panda over MuJoCo. `realtime` picks the wall-clock thread or as-fast-as-possible."""

    def __init__(self, world: World | None = None, realtime: bool = True, name: str = "panda",
                 rt_priority: int = LIBFRANKA_PRIORITY):
        self.world = world if world is not None else World(SceneSpec(objects=()))
        self.name = name
        self.realtime = realtime
        self._controller: TorqueController | None = None
        self._hold_q = self.world.q
        self._errors: list[str] = []
        self._gripper_cmd = _GripperCommand()
        self._fault_injection: str | None = None
        self.loop = LoopStats()                  # the 1 kHz loop's period error, tick time, missed ticks
        self._running = False
        self._thread: threading.Thread | None = None
        self.rt_refused: str | None = None      # why the loop is not SCHED_FIFO, if it is not
        if realtime:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="simpanda-1khz", daemon=True)
            self._thread.start()
            # as libfranka does for its control thread: try SCHED_FIFO, run on without it if refused
            self.rt_refused = make_realtime(self._thread, rt_priority)

    # --- time ------------------------------------------------------------------------------------
    def _clock(self) -> float:
        return time.perf_counter() if self.realtime else self.world.time

    def _wait_until(self, t: float) -> None:
        if self.realtime:
            dt = t - time.perf_counter()
            if dt > 0:
                time.sleep(dt)
        else:
            self.step_until(t)

    def step_until(self, t_sim: float) -> None:
        """Non-realtime only: advance physics until sim time >= t_sim."""
        while self.world.time < t_sim - 1e-9:
            with self.world.lock:
                self._tick()

    def _loop(self) -> None:
        run_periodic(self._locked_tick, DT, lambda: self._running, self.loop)

    def _locked_tick(self) -> None:
        with self.world.lock:
            try:
                self._tick()
            except Exception as e:  # a dead loop would leave the arm "moving" with nobody commanding it
                self._fault(f"control_loop_exception: {e!r}")

    def loop_timing(self) -> dict:
        """The 1 kHz loop's statistics and scheduling (empty before it has run 10 ticks)."""
        out = self.loop.summary()
        return {**out, "scheduling": scheduling(self._thread)} if out else {}

    def reset_loop_timing(self) -> None:
        self.loop.clear()

    def _tick(self) -> None:
        w = self.world
        ctrl = self._controller
        if self._fault_injection:
            self._fault(self._fault_injection)
            self._fault_injection = None
        if ctrl is not None:
            ctrl._now = w.time
            tau = ctrl._torque(w)
        else:  # no controller: the brakes hold the last position
            tau = 400.0 * (self._hold_q - w.q) - 40.0 * w.dq
        # ufuncs and array methods, not np.clip / np.any: their Python wrappers cost a tenth of the tick
        tau = np.minimum(np.maximum(tau, -TAU_MAX), TAU_MAX) + w.arm_bias()
        w.step(tau, self._gripper_cmd.finger_forces(w))
        if ctrl is not None:
            q, dq = w.q, w.dq
            if (q < _Q_LO).any() or (q > _Q_HI).any():
                self._fault("joint_position_limits_violation")
            elif (np.abs(dq) > DQ_MAX).any():
                self._fault("joint_velocity_violation")

    def _fault(self, error: str) -> None:
        self._errors.append(error)
        self._controller = None
        self._hold_q = self.world.q

    def inject_fault(self, error: str = "communication_constraints_violation") -> None:
        """Sim only: make the next control tick fault as the real robot's reflexes would."""
        self._fault_injection = error

    def close(self) -> None:
        self._running = False
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- the fingers (SimGripper's side door) ---------------------------------------------------
    def _gripper_reading(self) -> tuple[float, float]:
        with self.world.lock:
            return self.world.gripper_width, self.world.time

    def _gripper_set(self, width: float, speed: float, force: float, grasping: bool) -> None:
        with self.world.lock:  # the 1 kHz tick reads the command; a half-written one crashed it
            self._gripper_cmd.set(width, speed, force, grasping)

    # --- panda_py.Panda API ----------------------------------------------------------------------
    def get_state(self) -> SimRobotState:
        with self.world.lock:
            w = self.world
            pos, rot = w.tcp_pose()
            t = np.eye(4)
            t[:3, :3], t[:3, 3] = rot, pos
            mode = "kReflex" if self._errors else ("kMove" if self._controller else "kIdle")
            return SimRobotState(q=w.q, dq=w.dq, tau_J=w.arm_torque(), O_T_EE=t.flatten(order="F").tolist(),
                                 time=w.time, robot_mode=mode, current_errors=list(self._errors))

    @property
    def q(self) -> np.ndarray:
        with self.world.lock:
            return self.world.q

    def get_pose(self) -> np.ndarray:
        with self.world.lock:
            pos, rot = self.world.tcp_pose()
        t = np.eye(4)
        t[:3, :3], t[:3, 3] = rot, pos
        return t

    def start_controller(self, controller: TorqueController) -> None:
        if not isinstance(controller, TorqueController):
            raise TypeError(f"start_controller expects a controller, got {type(controller).__name__}")
        self.raise_error()
        with self.world.lock:
            controller._start(self.world)
            self._controller = controller

    def stop_controller(self) -> None:
        with self.world.lock:
            self._controller = None
            self._hold_q = self.world.q

    def recover(self) -> None:
        with self.world.lock:
            self._errors.clear()
            self._hold_q = self.world.q

    def raise_error(self) -> None:
        if self._errors:
            raise ControlException(f"Motion aborted by reflex! [{', '.join(self._errors)}]")

    def create_context(self, frequency: float, max_runtime: float = 0.0, max_iter: int = 0) -> SimPandaContext:
        return SimPandaContext(self, frequency, max_runtime, max_iter)

    def move_to_joint_position(self, positions, speed_factor: float = 0.2, stiffness: np.ndarray = _DEFAULT_STIFFNESS,
                               damping: np.ndarray = _DEFAULT_DAMPING, dq_threshold: float = 0.001,
                               success_threshold: float = 0.01) -> bool:
        """Blocking joint-space move through one or more waypoints (min-jerk segments)."""
        wps = np.asarray(positions, dtype=float)
        wps = wps[None] if wps.ndim == 1 else wps
        if wps.shape[1:] != (7,):
            raise ValueError(f"joint positions must be (7,) or (N, 7), got {np.shape(positions)}")
        if np.any(wps < Q_MIN) or np.any(wps > Q_MAX):
            raise ValueError("joint position target outside the Panda's joint limits")
        if not 0.0 < speed_factor <= 1.0:
            raise ValueError("speed_factor must be in (0, 1]")
        ctrl = JointPosition(stiffness, damping)
        self.start_controller(ctrl)
        ctx = self.create_context(frequency=1000)
        q0 = self.q
        for q1 in wps:
            # min-jerk peak velocity is 1.875 * distance / duration
            dur = max(0.2, float(np.max(1.875 * np.abs(q1 - q0) / (speed_factor * DQ_MAX))))
            while ctx.ok():
                s = min(1.0, ctx.time / dur) if dur > 0 else 1.0
                b = 10 * s**3 - 15 * s**4 + 6 * s**5
                ctrl.set_control(q0 + b * (q1 - q0))
                if s >= 1.0:
                    break
            ctx = self.create_context(frequency=1000)
            q0 = q1
        t_end = self._clock() + 2.0
        while ctx.ok() and self._clock() < t_end:  # settle
            st = self.get_state()
            if np.max(np.abs(st.q - wps[-1])) < success_threshold and np.max(np.abs(st.dq)) < dq_threshold * 50:
                break
        self.stop_controller()
        return bool(np.max(np.abs(self.q - wps[-1])) < success_threshold)

    def move_to_start(self, speed_factor: float = 0.2, stiffness: np.ndarray = _DEFAULT_STIFFNESS,
                      damping: np.ndarray = _DEFAULT_DAMPING, dq_threshold: float = 0.001,
                      success_threshold: float = 0.01) -> bool:
        return self.move_to_joint_position(Q_START, speed_factor, stiffness, damping, dq_threshold, success_threshold)

    def move_to_pose(self, position, orientation, speed_factor: float = 0.2,
                     impedance: np.ndarray = np.diag([800.0, 800.0, 800.0, 40.0, 40.0, 40.0]),
                     damping_ratio: float = 1.0, nullspace_stiffness: float = 15.0, dq_threshold: float = 0.001,
                     success_threshold: float = 0.02, orientation_threshold: float = 0.1) -> bool:
        """Blocking straight-line Cartesian move to one pose (position + quaternion x, y, z, w)."""
        x1 = _vec(position, 3, "position")
        r1 = quat_to_mat(_vec(orientation, 4, "orientation"))
        x0, r0 = self.get_pose()[:3, 3], self.get_pose()[:3, :3]
        ctrl = CartesianImpedance(impedance, damping_ratio, nullspace_stiffness)
        q_null = self.q
        self.start_controller(ctrl)
        dur = max(0.3, 1.875 * np.linalg.norm(x1 - x0) / (speed_factor * 1.7))  # 1.7 m/s Cartesian limit
        dur = max(dur, 1.875 * np.linalg.norm(orientation_error(r1, r0)) / (speed_factor * 2.5))
        ctx = self.create_context(frequency=1000)
        rv = orientation_error(r1, r0)
        while ctx.ok():
            s = min(1.0, ctx.time / dur)
            b = 10 * s**3 - 15 * s**4 + 6 * s**5
            ctrl.set_control(x0 + b * (x1 - x0), mat_to_quat(rotvec_to_mat(b * rv) @ r0), q_null)
            if s >= 1.0 and ctx.time > dur + 0.5:
                break
        self.stop_controller()
        pose = self.get_pose()
        return bool(np.linalg.norm(pose[:3, 3] - x1) < success_threshold
                    and np.linalg.norm(orientation_error(r1, pose[:3, :3])) < orientation_threshold)


# ----------------------------------------------------------------------------------------------
# Gripper (panda_py.libfranka.Gripper)
# ----------------------------------------------------------------------------------------------
@dataclass
class SimGripperState:
    width: float
    max_width: float
    is_grasped: bool
    temperature: int
    time: float


class _GripperCommand:
    """Finger PD with a force cap, evaluated on the control thread each tick."""

    def __init__(self):
        self.goal = GRIPPER_MAX_WIDTH  # target width (m)
        self.speed = 0.1
        self.force = 20.0
        self.target: float | None = None  # ramped width target
        self.grasping = False

    def set(self, width: float, speed: float, force: float, grasping: bool) -> None:
        self.goal, self.speed, self.force, self.grasping = width, speed, force, grasping
        self.target = None  # restart the ramp from where the fingers are, not where the last one ended

    def finger_forces(self, w: World) -> np.ndarray:
        width = w.gripper_width
        if self.target is None:
            self.target = width
        goal = 0.0 if self.grasping else self.goal  # a grasp squeezes until blocked
        step = self.speed * DT
        self.target += min(max(goal - self.target, -step), step)
        fv = w.data.qvel[w.f_vadr]
        fq = w.data.qpos[w.f_qadr]
        f = 3000.0 * (self.target / 2 - fq) - 30.0 * fv
        return np.minimum(np.maximum(f, -self.force), self.force)


class SimGripper:
    """panda_py.libfranka.Gripper in sim. Commands block like the real ones; `*_async` do not.
    It talks to the fingers only through `panda._gripper_reading` / `_gripper_set`, so the same class
    serves SimPanda and its out-of-process twin (`sim/panda_process.py`)."""

    def __init__(self, panda):
        self._panda = panda
        self._grasp_window: tuple[float, float] | None = None
        self._grasping = False
        self._force = 20.0

    def read_once(self) -> SimGripperState:
        width, t = self._panda._gripper_reading()
        lo_hi = self._grasp_window
        grasped = bool(self._grasping and lo_hi is not None and lo_hi[0] <= width <= lo_hi[1])
        return SimGripperState(width=width, max_width=GRIPPER_MAX_WIDTH, is_grasped=grasped, temperature=30, time=t)

    def _send(self, width: float, speed: float, force: float, grasping: bool) -> None:
        self._grasping, self._force = grasping, force
        self._panda._gripper_set(width, speed, force, grasping)

    def move_async(self, width: float, speed: float) -> None:
        if not 0.0 <= width <= GRIPPER_MAX_WIDTH:
            raise ValueError(f"gripper width {width} outside [0, {GRIPPER_MAX_WIDTH}] m")
        if speed <= 0:
            raise ValueError("gripper speed must be > 0")
        self._grasp_window = None
        self._send(width, speed, 20.0, grasping=False)

    def grasp_async(self, width: float, speed: float, force: float, epsilon_inner: float = 0.005,
                    epsilon_outer: float = 0.005) -> None:
        if not 0.0 <= width <= GRIPPER_MAX_WIDTH:
            raise ValueError(f"grasp width {width} outside [0, {GRIPPER_MAX_WIDTH}] m")
        if not 0.0 < force <= 140.0:
            raise ValueError("grasp force must be in (0, 140] N")
        self._grasp_window = (width - epsilon_inner, width + epsilon_outer)
        self._send(width, speed, force, grasping=True)

    def _wait_settled(self, timeout: float = 3.0) -> None:
        # Not a PandaContext: the gripper is a separate device and keeps working while the arm is in reflex.
        p = self._panda
        t0 = t = p._clock()
        prev, still = None, 0
        while t - t0 < timeout:
            t += 0.01
            p._wait_until(t)
            width = self.read_once().width
            still = still + 1 if prev is not None and abs(width - prev) < 1e-5 else 0
            prev = width
            if still >= 5:
                return

    def move(self, width: float, speed: float) -> bool:
        self.move_async(width, speed)
        self._wait_settled()
        return abs(self.read_once().width - width) < 0.005

    def grasp(self, width: float, speed: float, force: float, epsilon_inner: float = 0.005,
              epsilon_outer: float = 0.005) -> bool:
        self.grasp_async(width, speed, force, epsilon_inner, epsilon_outer)
        self._wait_settled()
        return self.read_once().is_grasped

    def homing(self) -> bool:
        return self.move(GRIPPER_MAX_WIDTH, 0.1)

    def stop(self) -> bool:
        self._send(self.read_once().width, 0.1, self._force, self._grasping)
        return True


def connect_twin(host: str, enforce_realtime: bool = False):
    """The sim twin where the panda backend connects (runtime/panda_process.py's `connect`): an empty
    cell's SimPanda with its own 1 kHz thread, its gripper and its controllers, answering as
    (panda_py.Panda, libfranka.Gripper, panda_py.controllers) would. `host` is not dialled."""
    import sys
    arm = SimPanda(World(SceneSpec(objects=())), realtime=True)
    return arm, SimGripper(arm), sys.modules[__name__]
