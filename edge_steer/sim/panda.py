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
import weakref
from collections import deque

import numpy as np

from edge_steer.franka.arm import DEFAULT_DAMPING as _DEFAULT_DAMPING
from edge_steer.franka.arm import DEFAULT_IMPEDANCE as _DEFAULT_IMPEDANCE
from edge_steer.franka.arm import DEFAULT_STIFFNESS as _DEFAULT_STIFFNESS
from edge_steer.franka.arm import DQ_MAX, GRIPPER_MAX_WIDTH, MOVE_TO_POSE_IMPEDANCE, Q_MAX, Q_MIN, Q_START, TAU_MAX, frames
from edge_steer.franka.queries import PandaQueries
from edge_steer.franka.types import ControlException, Duration, GripperState, RealtimeConfig, RobotMode, RobotState
from edge_steer.franka.types import check_vec as _vec
from edge_steer.geometry import mat_to_quat, orientation_error, quat_to_mat, rotvec_to_mat
from edge_steer.realtime import LIBFRANKA_PRIORITY, LoopStats, make_realtime, run_periodic, scheduling
from edge_steer.sim.scene import SceneSpec
from edge_steer.sim.world import World

DT = 0.001


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
        self._t0 = panda.clock()
        self._next = self._t0

    @property
    def time(self) -> float:
        return self._panda.clock() - self._t0

    def ok(self) -> bool:
        p = self._panda
        if self.num_ticks > 0:
            self._next += self._period
            p.wait_until(self._next)
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
_HOSTS: "weakref.WeakValueDictionary[str, SimPanda]" = weakref.WeakValueDictionary()   # the sim's "network"
SERVER_VERSION = 5          # libfranka's robot and gripper protocol versions the twin reports


class SimPanda(PandaQueries):
    """panda_py.Panda over MuJoCo, constructed as panda-py's: `SimPanda(hostname, name, realtime_config)`
    opens an empty cell reachable under `hostname` (`SimGripper(hostname)` finds it). The sim's own
    keywords: `world` (the cell to drive instead), `realtime` (the wall-clock 1 kHz thread, or physics only
    inside blocking calls and `ctx.ok()`), `rt_priority`. A World passed as `hostname` is taken as `world`."""

    def __init__(self, hostname: "str | World | None" = "sim", name: str = "panda",
                 realtime_config: RealtimeConfig = RealtimeConfig.kIgnore, *, world: World | None = None,
                 realtime: bool = True, rt_priority: int = LIBFRANKA_PRIORITY):
        if isinstance(hostname, World) or hostname is None:
            world, hostname = hostname if world is None else world, "sim"
        self.world = world if world is not None else World(SceneSpec(objects=()))
        self.hostname = str(hostname)
        _HOSTS[self.hostname] = self
        self.name = name
        self.realtime = realtime
        self._log: deque | None = None
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
            # (kIgnore), or refuse to run (kEnforce)
            self.rt_refused = make_realtime(self._thread, rt_priority)
            if self.rt_refused and realtime_config == RealtimeConfig.kEnforce:
                self.close()
                raise ControlException(f"libfranka: realtime scheduling refused ({self.rt_refused}) and "
                                       "realtime_config is kEnforce")

    # --- time (the sim's own; SimGripper and the context use them) ---------------------------------
    def clock(self) -> float:
        return time.perf_counter() if self.realtime else self.world.time

    def wait_until(self, t: float) -> None:
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
        run_periodic(self.tick, DT, lambda: self._running, self.loop)

    def tick(self) -> None:
        """One millisecond of control and physics (the 1 kHz loop's body, for whoever owns that loop: the
        thread here, or the robot process's child). A tick that raises faults the arm, never the loop."""
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
        if self._log is not None:
            self._log.append((w.q, w.dq, w.arm_torque(), self.get_pose().ravel(order="F"), w.time))
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

    # --- the sim's side: the running controller, the faults, the fingers (SimGripper's side door) -----
    @property
    def controller(self) -> "TorqueController | None":
        return self._controller

    @property
    def errors(self) -> list[str]:
        return list(self._errors)

    def gripper_reading(self) -> tuple[float, float]:
        with self.world.lock:
            return self.world.gripper_width, self.world.time

    def set_fingers(self, width: float, speed: float, force: float, grasping: bool) -> None:
        with self.world.lock:  # the 1 kHz tick reads the command; a half-written one crashed it
            self._gripper_cmd.set(width, speed, force, grasping)

    # --- panda_py.Panda API ----------------------------------------------------------------------
    def get_state(self) -> RobotState:
        with self.world.lock:
            w = self.world
            pos, rot = w.tcp_pose()
            t = np.eye(4)
            t[:3, :3], t[:3, 3] = rot, pos
            mode = RobotMode.kReflex if self._errors else (RobotMode.kMove if self._controller else RobotMode.kIdle)
            return RobotState.make(w.q, w.dq, w.arm_torque(), t.ravel(order="F"), w.time, mode, self._errors)

    def refresh_state(self) -> None:
        """The sim's state is always the latest: nothing to read."""

    def is_moving(self) -> bool:
        """panda-py's meaning: a controller is running (this instance has the arm under active control)."""
        return self._controller is not None

    def get_model(self) -> SimModel:
        return SimModel()

    def get_robot(self) -> "SimRobot":
        return SimRobot(self)

    def set_default_behavior(self) -> None:
        """panda-py sets libfranka's collision thresholds and impedances to its defaults; the sim has no
        collision thresholds and its controllers carry their own gains, so this changes nothing."""

    def teaching_mode(self, active: bool, damping: np.ndarray = np.zeros(7)) -> None:
        """Hand guiding: the arm floats under gravity compensation with `damping` on each joint (a
        controller runs meanwhile, as in panda-py); False stops it."""
        if active:
            self.start_controller(_Teaching(_vec(damping, 7, "damping")))
        elif isinstance(self._controller, _Teaching):
            self.stop_controller()

    def enable_logging(self, buffer_size: int) -> None:
        """Keep the last `buffer_size` ticks of state (get_log)."""
        if int(buffer_size) <= 0:
            raise ValueError("buffer_size must be > 0")
        with self.world.lock:
            self._log = deque(maxlen=int(buffer_size))

    def disable_logging(self) -> None:
        with self.world.lock:
            self._log = None

    def get_log(self) -> dict[str, list[np.ndarray]]:
        """The logged ticks, oldest first, keyed by RobotState field as panda-py's (q, dq, tau_J, O_T_EE;
        `time` in ms, as libfranka's Duration counts). Empty lists before enable_logging."""
        with self.world.lock:
            rows = list(self._log or ())
        keys = ("q", "dq", "tau_J", "O_T_EE")
        out = {k: [np.asarray(r[i], dtype=float) for r in rows] for i, k in enumerate(keys)}
        out["time"] = [np.array([round(r[4] * 1000.0)], dtype=float) for r in rows]
        return out

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

    def move_to_joint_position(self, *args, **kwargs) -> bool:
        """panda-py's two overloads: `(waypoints, ...)`, a list of joint positions, or `(positions, ...)`,
        one; then speed_factor=0.2, stiffness, damping, dq_threshold=0.001, success_threshold=0.01.
        Blocking, through each waypoint in min-jerk segments; returns whether it ended within
        success_threshold rad of the last one."""
        (target,), opts = _overload("move_to_joint_position", args, kwargs, _JOINT_MOVE_OPTIONS)
        wps = np.asarray(target, dtype=float)
        wps = wps[None] if wps.ndim == 1 else wps
        if wps.ndim != 2 or wps.shape[1:] != (7,) or not len(wps):
            raise ValueError(f"joint positions must be (7,) or (N, 7), got {np.shape(target)}")
        if not np.isfinite(wps).all():
            raise ValueError("joint positions contain NaN or inf")
        if np.any(wps < Q_MIN) or np.any(wps > Q_MAX):
            raise ValueError("joint position target outside the Panda's joint limits")
        speed_factor = float(opts["speed_factor"])
        if not 0.0 < speed_factor <= 1.0:
            raise ValueError("speed_factor must be in (0, 1]")
        ctrl = JointPosition(opts["stiffness"], opts["damping"])
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
        success, dq_threshold = float(opts["success_threshold"]), float(opts["dq_threshold"])
        t_end = self.clock() + 2.0
        while ctx.ok() and self.clock() < t_end:  # settle
            with self.world.lock:
                q, dq = self.world.q, self.world.dq
            if np.max(np.abs(q - wps[-1])) < success and np.max(np.abs(dq)) < dq_threshold * 50:
                break
        self.stop_controller()
        return bool(np.max(np.abs(self.q - wps[-1])) < success)

    def move_to_start(self, speed_factor: float = 0.2, stiffness: np.ndarray = _DEFAULT_STIFFNESS,
                      damping: np.ndarray = _DEFAULT_DAMPING, dq_threshold: float = 0.001,
                      success_threshold: float = 0.01) -> bool:
        return self.move_to_joint_position(Q_START, speed_factor, stiffness, damping, dq_threshold, success_threshold)

    def move_to_pose(self, *args, **kwargs) -> bool:
        """panda-py's four overloads: `(positions, orientations, ...)` (lists of waypoints), `(position,
        orientation, ...)`, `(pose, ...)` with a list of 4x4 poses or one; then speed_factor=0.2,
        impedance, damping_ratio=1.0, nullspace_stiffness=15.0, dq_threshold=0.001, success_threshold=0.02,
        orientation_threshold=0.1. Blocking, straight lines through the waypoints (min-jerk each);
        returns whether it ended within the thresholds of the last one. Quaternions are x, y, z, w."""
        targets, opts = _overload("move_to_pose", args, kwargs, _POSE_MOVE_OPTIONS)
        goals = _pose_waypoints(targets)
        speed_factor = float(opts["speed_factor"])
        if not 0.0 < speed_factor <= 1.0:
            raise ValueError("speed_factor must be in (0, 1]")
        ctrl = CartesianImpedance(opts["impedance"], opts["damping_ratio"], opts["nullspace_stiffness"])
        q_null = self.q
        pose = self.get_pose()
        x0, r0 = pose[:3, 3], pose[:3, :3]
        self.start_controller(ctrl)
        for k, (x1, r1) in enumerate(goals):
            settle = 0.5 if k == len(goals) - 1 else 0.0     # on the last waypoint only
            dur = max(0.3, 1.875 * np.linalg.norm(x1 - x0) / (speed_factor * 1.7))  # 1.7 m/s Cartesian limit
            dur = max(dur, 1.875 * np.linalg.norm(orientation_error(r1, r0)) / (speed_factor * 2.5))
            ctx = self.create_context(frequency=1000)
            rv = orientation_error(r1, r0)
            while ctx.ok():
                s = min(1.0, ctx.time / dur)
                b = 10 * s**3 - 15 * s**4 + 6 * s**5
                ctrl.set_control(x0 + b * (x1 - x0), mat_to_quat(rotvec_to_mat(b * rv) @ r0), q_null)
                if s >= 1.0 and ctx.time >= dur + settle:
                    break
            x0, r0 = x1, r1
        self.stop_controller()
        pose = self.get_pose()
        x1, r1 = goals[-1]
        return bool(np.linalg.norm(pose[:3, 3] - x1) < float(opts["success_threshold"])
                    and np.linalg.norm(orientation_error(r1, pose[:3, :3])) < float(opts["orientation_threshold"]))


_JOINT_MOVE_OPTIONS = (("speed_factor", 0.2), ("stiffness", _DEFAULT_STIFFNESS), ("damping", _DEFAULT_DAMPING),
                       ("dq_threshold", 0.001), ("success_threshold", 0.01))
_POSE_MOVE_OPTIONS = (("speed_factor", 0.2), ("impedance", MOVE_TO_POSE_IMPEDANCE), ("damping_ratio", 1.0),
                      ("nullspace_stiffness", 15.0), ("dq_threshold", 0.001), ("success_threshold", 0.02),
                      ("orientation_threshold", 0.1))


_TARGETS = {"move_to_pose": (("positions", "orientations"), ("position", "orientation"), ("pose",)),
            "move_to_joint_position": (("waypoints",), ("positions",))}


# each overload's parameters (name, default; _REQUIRED for none), as panda-py's docstrings list them: what
# _overload parses, and what tests/test_sim_robot.py compares against the installed panda_py
_REQUIRED = object()
SimPanda.move_to_joint_position.overloads = [[(t, _REQUIRED), *_JOINT_MOVE_OPTIONS] for (t,) in
                                            _TARGETS["move_to_joint_position"]]
SimPanda.move_to_pose.overloads = [[*((t, _REQUIRED) for t in targets), *_POSE_MOVE_OPTIONS]   # pose: a list, or one
                                   for targets in (*_TARGETS["move_to_pose"], ("pose",))]


def _overload(fn: str, args: tuple, kwargs: dict, options: tuple) -> tuple[list, dict]:
    """Split a pybind-style overloaded call into its targets and its options (positional after the targets,
    or by keyword, with panda-py's defaults). The overload is the one whose target names the keywords use,
    else the one the leading positionals' shapes fit (position + orientation: a 3- then a 4-vector).
    TypeError for anything panda-py would refuse."""
    kw = dict(kwargs)
    named = {n for ts in _TARGETS[fn] for n in ts if n in kw}
    if named:
        fits = [ts for ts in _TARGETS[fn] if named <= set(ts)]
        if not fits:
            raise TypeError(f"{fn}(): incompatible targets {sorted(named)}; one of {_TARGETS[fn]}")
        names = fits[0]
    else:
        pairs = fn == "move_to_pose" and len(args) >= 2 and np.shape(args[1])[-1:] == (4,) \
            and np.asarray(args[0], dtype=object).shape[-1:] == (3,)
        names = _TARGETS[fn][0 if fn == "move_to_joint_position" else (1 if pairs else 2)]
    args = list(args)
    targets = []
    for name in names:            # leading positionals fill the targets not given by keyword
        if name in kw:
            targets.append(kw.pop(name))
        elif args:
            targets.append(args.pop(0))
        else:
            raise TypeError(f"{fn}(): missing target {name!r}")
    if len(args) > len(options):
        raise TypeError(f"{fn}(): too many arguments")
    opts = {}
    for i, (name, default) in enumerate(options):
        if i < len(args):
            if name in kw:
                raise TypeError(f"{fn}(): {name} given twice")
            opts[name] = args[i]
        else:
            opts[name] = kw.pop(name, default)
    if kw:
        raise TypeError(f"{fn}(): unexpected arguments {sorted(kw)}")
    return targets, opts


def _pose_waypoints(targets: list) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(position, rotation)] from move_to_pose's targets: positions + orientations, or poses."""
    if len(targets) == 2:
        p, o = np.asarray(targets[0], dtype=float), np.asarray(targets[1], dtype=float)
        p, o = (p[None], o[None]) if p.ndim == 1 else (p, o)
        if p.ndim != 2 or p.shape[1] != 3 or o.shape != (len(p), 4) or not len(p):
            raise ValueError(f"positions must be (3,) or (N, 3) and orientations (4,) or (N, 4) alike, "
                             f"got {np.shape(targets[0])} and {np.shape(targets[1])}")
        out = []
        for x, quat in zip(p, o):
            x, quat = _vec(x, 3, "position"), _vec(quat, 4, "orientation")
            if abs(np.linalg.norm(quat) - 1.0) > 1e-3:
                raise ValueError(f"orientation must be a unit quaternion (x, y, z, w), norm={np.linalg.norm(quat):.4f}")
            out.append((x, quat_to_mat(quat)))
        return out
    t = np.asarray(targets[0], dtype=float)
    t = t[None] if t.ndim == 2 else t
    if t.ndim != 3 or t.shape[1:] != (4, 4) or not len(t):
        raise ValueError(f"pose must be 4x4 or a list of 4x4, got {np.shape(targets[0])}")
    if not np.isfinite(t).all():
        raise ValueError("pose contains NaN or inf")
    for m in t:
        r = m[:3, :3]
        if not (np.allclose(r @ r.T, np.eye(3), atol=1e-6) and np.linalg.det(r) > 0 and np.allclose(m[3], [0, 0, 0, 1])):
            raise ValueError("pose must be a homogeneous transformation (rotation block orthonormal, last row 0 0 0 1)")
    return [(m[:3, 3].copy(), m[:3, :3].copy()) for m in t]


class _Teaching(TorqueController):
    """teaching_mode's controller: gravity compensated (the robot does that), joint damping only."""

    def __init__(self, damping: np.ndarray):
        super().__init__()
        self._kd = damping

    def _torque(self, world: World) -> np.ndarray:
        return -self._kd * world.dq


class SimModel:
    """libfranka.Model's kinematics for the twin: `pose` and `zero_jacobian` of a frame at a robot state
    (libfranka.Frame values 0-6 joints 1-7, 7 flange, 8 end effector); the dynamics terms are not modelled."""

    def pose(self, frame, robot_state: RobotState) -> np.ndarray:
        """The frame's pose (4x4, base frame), column-major flattened as libfranka returns it (16 numbers)."""
        return frames(np.asarray(robot_state.q, dtype=float))[_frame_index(frame)].ravel(order="F")

    def zero_jacobian(self, frame, robot_state: RobotState) -> np.ndarray:
        """The frame's 6x7 geometric Jacobian in the base frame, column-major flattened (42 numbers)."""
        fs = frames(np.asarray(robot_state.q, dtype=float))
        k = _frame_index(frame)
        p = fs[k][:3, 3]
        jac = np.zeros((6, 7))
        for i in range(min(k + 1, 7)):
            z, o = fs[i][:3, 2], fs[i][:3, 3]
            jac[:3, i], jac[3:, i] = np.cross(z, p - o), z
        return jac.ravel(order="F")


def _frame_index(frame) -> int:
    i = int(getattr(frame, "value", frame))
    if not 0 <= i <= 8:
        raise ValueError(f"frame must be libfranka.Frame kJoint1..kEndEffector (0-8), got {frame!r}")
    return i


class SimRobot:
    """libfranka.Robot behind the twin (Panda.get_robot): the calls that make sense without an FCI link."""

    def __init__(self, panda: "SimPanda"):
        self._panda = panda

    def read_once(self) -> RobotState:
        return self._panda.get_state()

    def server_version(self) -> int:
        return SERVER_VERSION

    def stop(self) -> None:
        self._panda.stop_controller()

    def automatic_error_recovery(self) -> None:
        self._panda.recover()

    def load_model(self) -> SimModel:
        return SimModel()


# ----------------------------------------------------------------------------------------------
# Gripper (panda_py.libfranka.Gripper)
# ----------------------------------------------------------------------------------------------
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
    """panda_py.libfranka.Gripper in sim, constructed as libfranka's: `SimGripper(franka_address)` reaches
    the SimPanda opened under that hostname. The sim may also pass the arm object itself (SimPanda or its
    out-of-process twin, sim/panda_process.py): the gripper talks to the fingers only through its
    `gripper_reading` / `set_fingers`. Commands block like the real ones; `*_async` (the sim's) do not."""

    def __init__(self, franka_address):
        if isinstance(franka_address, str):
            panda = _HOSTS.get(franka_address)
            if panda is None:
                raise ControlException(f"libfranka: no robot answers at {franka_address} (open a SimPanda there first)")
        else:
            panda = franka_address
        self._panda = panda
        self._grasp_window: tuple[float, float] | None = None
        self._grasping = False
        self._force = 20.0

    def server_version(self) -> int:
        return SERVER_VERSION

    def read_once(self) -> GripperState:
        width, t = self._panda.gripper_reading()
        lo_hi = self._grasp_window
        grasped = bool(self._grasping and lo_hi is not None and lo_hi[0] <= width <= lo_hi[1])
        return GripperState(width=width, max_width=GRIPPER_MAX_WIDTH, is_grasped=grasped, temperature=30,
                            time=Duration.from_sec(t))

    def _send(self, width: float, speed: float, force: float, grasping: bool) -> None:
        self._grasping, self._force = grasping, force
        self._panda.set_fingers(width, speed, force, grasping)

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
        t0 = t = p.clock()
        prev, still = None, 0
        while t - t0 < timeout:
            t += 0.01
            p.wait_until(t)
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
    arm = SimPanda(host, realtime_config=RealtimeConfig.kEnforce if enforce_realtime else RealtimeConfig.kIgnore)
    return arm, SimGripper(host), sys.modules[__name__]
