"""Safety, in one place: the setpoint filter every 1 kHz target passes, and the state checks
(joint margins, robot errors, stale frames, late inference) that hold the arm or fault the daemon.

Setpoint filter guarantees, for any input sequence (NaN, inf, jumps, targets outside the box):
  * every output is finite and inside the workspace box;
  * per axis, |p[n+1] - p[n]| <= max_speed * dt and |p[n+1] - 2 p[n] + p[n-1]| <= max_accel * dt^2;
  * the rotation step is <= max_rot_speed * dt and its change <= max_rot_accel * dt^2.
The box is kept with the accel limit intact by braking: per axis, the filter never moves faster than
it could still stop before a wall with the allowed deceleration (exact for the discrete sequence, see
`braking_step`). The same braking, relative to the target, makes it track without overshoot, so the
filter doubles as the setpoint stage's velocity/acceleration-limited interpolation.

The 1 kHz side uses plain floats and preallocated lists: no numpy temporaries, no allocation-heavy work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edge_steer.franka.arm import DQ_MAX, Q_MAX, Q_MIN   # Franka's published limits
from edge_steer.runtime.config import SafetyConfig


def braking_step(d: float, delta: float) -> float:
    """Largest step s (>= 0) from which the sequence s-delta, s-2 delta, ... (>0) stays within distance d.

    The discrete braking distance of step s is D(s) = s + D(s - delta), D(s <= 0) = 0; on
    (n delta, (n+1) delta] it is (n+1) s - delta n (n+1) / 2. Solving D(s) = d gives the step below.
    Because D(s) = s + D(s - delta), a step allowed now leaves the next one (s - delta) allowed too,
    so the filter can always satisfy the box and the acceleration limit together."""
    if d <= 0.0:
        return 0.0
    n = math.floor((math.sqrt(1.0 + 8.0 * d / delta) - 1.0) * 0.5)
    return min(d, (d + delta * n * (n + 1) * 0.5) / (n + 1))


def _braking_distance(s: float, delta: float) -> float:
    if s <= 0.0:
        return 0.0
    n = math.ceil(s / delta) - 1
    return (n + 1) * s - delta * n * (n + 1) * 0.5


# ---- quaternions (x, y, z, w) on plain floats -------------------------------------------------
def qmul(a, b) -> tuple[float, float, float, float]:
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return (aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz)


def qexp(vx: float, vy: float, vz: float) -> tuple[float, float, float, float]:
    """Rotation vector -> unit quaternion."""
    a = math.sqrt(vx * vx + vy * vy + vz * vz)
    if a < 1e-12:
        return (0.5 * vx, 0.5 * vy, 0.5 * vz, 1.0)
    k = math.sin(0.5 * a) / a
    return (k * vx, k * vy, k * vz, math.cos(0.5 * a))


def qlog(q) -> tuple[float, float, float]:
    """Unit quaternion -> rotation vector of the shortest rotation (angle in [0, pi])."""
    x, y, z, w = q
    if w < 0:
        x, y, z, w = -x, -y, -z, -w
    n = math.sqrt(x * x + y * y + z * z)
    if n < 1e-12:
        return (2.0 * x, 2.0 * y, 2.0 * z)
    k = 2.0 * math.atan2(n, w) / n
    return (k * x, k * y, k * z)


def qconj(q) -> tuple[float, float, float, float]:
    return (-q[0], -q[1], -q[2], q[3])


def _finite(*xs: float) -> bool:
    for x in xs:
        if not math.isfinite(x):
            return False
    return True


class SafetyFilter:
    """Turns a raw 1 kHz target (position + quaternion + its per-tick velocity) into a safe setpoint.

    `p` (3 floats) and `q` (x, y, z, w) hold the latest safe setpoint; `step` and `omega` are its
    per-tick translation and rotation vector. `apply` returns False when the raw target was rejected
    (non-finite or not a rotation): the setpoint then brakes to a stop and the caller faults."""

    def __init__(self, cfg: SafetyConfig, dt: float):
        self.cfg, self.dt = cfg, dt
        self.lo = [float(x) for x in cfg.workspace_min]
        self.hi = [float(x) for x in cfg.workspace_max]
        self.vstep = cfg.max_speed * dt            # max |step| per axis
        self.delta = cfg.max_accel * dt * dt       # max change of step per axis
        self.wstep = cfg.max_rot_speed * dt
        self.wdelta = cfg.max_rot_accel * dt * dt
        self.p = [0.0, 0.0, 0.0]
        self.q = (0.0, 0.0, 0.0, 1.0)
        self.step = [0.0, 0.0, 0.0]
        self.omega = [0.0, 0.0, 0.0]
        self.rejected = 0

    def inside(self, p) -> bool:
        return all(lo <= x <= hi for x, lo, hi in zip(p, self.lo, self.hi))

    def reset(self, p, q) -> None:
        """Start from a measured pose at rest. Refuses a pose outside the workspace box."""
        p = [float(x) for x in p]
        q = tuple(float(x) for x in q)
        if not _finite(*p, *q):
            raise SafetyViolation(f"measured pose is not finite: {p} {q}")
        if not self.inside(p):
            raise SafetyViolation(f"TCP {[round(x, 3) for x in p]} is outside the workspace box "
                                  f"{self.lo}..{self.hi}; move the arm inside it first")
        n = math.sqrt(sum(x * x for x in q))
        self.p, self.q = p, tuple(x / n for x in q)
        self.step[:] = (0.0, 0.0, 0.0)
        self.omega[:] = (0.0, 0.0, 0.0)

    def brake_target(self) -> tuple[list[float], tuple[float, float, float, float]]:
        """Where the setpoint comes to rest when braking as hard as allowed from now: the hold target."""
        p = [x + math.copysign(_braking_distance(abs(s), self.delta), s) for x, s in zip(self.p, self.step)]
        p = [min(max(x, lo), hi) for x, lo, hi in zip(p, self.lo, self.hi)]
        wx, wy, wz = self.omega
        w = math.sqrt(wx * wx + wy * wy + wz * wz)
        if w > 0.0:
            k = _braking_distance(w, self.wdelta) / w
            q = qmul(qexp(k * wx, k * wy, k * wz), self.q)
        else:
            q = self.q
        return p, q

    def apply(self, rp, rq, up=(0.0, 0.0, 0.0), uw=(0.0, 0.0, 0.0)) -> bool:
        """One tick. rp/rq: raw target position/quaternion; up/uw: its per-tick velocity (feed-forward)."""
        ok = _finite(*rp, *rq, *up, *uw)
        if ok:
            qn = rq[0] * rq[0] + rq[1] * rq[1] + rq[2] * rq[2] + rq[3] * rq[3]
            ok = abs(qn - 1.0) < 1e-3
        if not ok:  # reject: brake to a stop along the current motion, stay in the box
            self.rejected += 1
            rp, rq = self.brake_target()
            up = uw = (0.0, 0.0, 0.0)
        delta, vstep = self.delta, self.vstep
        p, step = self.p, self.step
        for i in range(3):
            lo, hi = self.lo[i], self.hi[i]
            f = p[i]
            r = min(max(rp[i], lo), hi)
            e = r - f
            des = up[i] + (braking_step(e, delta) if e >= 0.0 else -braking_step(-e, delta))
            s = step[i]
            lower = max(s - delta, -vstep, -braking_step(f - lo, delta))
            upper = min(s + delta, vstep, braking_step(hi - f, delta))
            s = min(max(des, lower), upper)
            f = min(max(f + s, lo), hi)
            step[i] = f - p[i]
            p[i] = f
        # rotation: the same braking law on the error angle, norm-limited speed and acceleration
        ex, ey, ez = qlog(qmul(rq, qconj(self.q)))
        e = math.sqrt(ex * ex + ey * ey + ez * ez)
        k = braking_step(e, self.wdelta) / e if e > 1e-12 else 0.0
        dx, dy, dz = uw[0] + k * ex, uw[1] + k * ey, uw[2] + k * ez
        n = math.sqrt(dx * dx + dy * dy + dz * dz)
        if n > self.wstep:
            c = self.wstep / n
            dx, dy, dz = c * dx, c * dy, c * dz
        om = self.omega
        cx, cy, cz = dx - om[0], dy - om[1], dz - om[2]
        n = math.sqrt(cx * cx + cy * cy + cz * cz)
        if n > self.wdelta:
            c = self.wdelta / n
            cx, cy, cz = c * cx, c * cy, c * cz
        om[0] += cx
        om[1] += cy
        om[2] += cz
        q = qmul(qexp(om[0], om[1], om[2]), self.q)
        n = math.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3])
        self.q = (q[0] / n, q[1] / n, q[2] / n, q[3] / n)
        return ok


class SafetyViolation(RuntimeError):
    """A state check failed; the message is the fault reason."""


# ---- state checks (run on the monitor thread at telemetry rate, not on the 1 kHz side) ---------
@dataclass(frozen=True)
class JointLimits:
    lower: np.ndarray
    upper: np.ndarray
    velocity: np.ndarray      # rad/s, the robot's own reflex threshold

    @classmethod
    def panda(cls) -> "JointLimits":
        return cls(np.asarray(Q_MIN, float), np.asarray(Q_MAX, float), np.asarray(DQ_MAX, float))


def check_joints(q: np.ndarray, limits: JointLimits, margin: float, dq: np.ndarray | None = None,
                 velocity_share: float = 1.0) -> str | None:
    """A joint within `margin` rad of a position limit, or faster than `velocity_share` of its speed
    limit. The Cartesian limits do not bound joint speeds: near a singularity a slow TCP can need
    fast joints, and the robot's own reflex at the limit would stop it with an error, so we stop first."""
    q = np.asarray(q, dtype=float)
    if q.shape != limits.lower.shape or not np.all(np.isfinite(q)):
        return f"joint positions not finite or wrong shape: {q}"
    low = np.flatnonzero(q < limits.lower + margin)
    high = np.flatnonzero(q > limits.upper - margin)
    if low.size or high.size:
        j = int((low if low.size else high)[0])
        return (f"joint_limit_margin: joint {j + 1} at {q[j]:.3f} rad is within {margin} rad of its limit "
                f"[{limits.lower[j]:.3f}, {limits.upper[j]:.3f}]")
    if dq is None:
        return None
    dq = np.asarray(dq, dtype=float)
    if dq.shape != limits.velocity.shape or not np.all(np.isfinite(dq)):
        return f"joint velocities not finite or wrong shape: {dq}"
    fast = np.flatnonzero(np.abs(dq) > velocity_share * limits.velocity)
    if fast.size:
        j = int(fast[0])
        return (f"joint_velocity_margin: joint {j + 1} at {dq[j]:.2f} rad/s exceeds {velocity_share:.0%} "
                f"of its {limits.velocity[j]:.3f} rad/s limit")
    return None


def check_robot_errors(errors: list[str], mode: str) -> str | None:
    if errors:
        return "robot_error: " + ", ".join(map(str, errors))
    if mode in ("kReflex", "kUserStopped"):
        return f"robot_error: robot mode {mode}"
    return None


@dataclass
class WatchdogVerdict:
    hold: str | None = None      # hold the arm for this reason (recoverable by itself)
    fault: str | None = None     # go to FAULT for this reason (recover on command only)


def check_watchdogs(cfg: SafetyConfig, now: float, frame_age_s: float | None, running_since: float | None,
                    last_chunk_at: float | None) -> WatchdogVerdict:
    """Stale-frame and inference-deadline watchdogs while RUNNING (`running_since` is not None).

    frame_age_s: age of the oldest camera's newest frame (None: no frame yet);
    last_chunk_at: when the last usable chunk arrived (None: none since running)."""
    v = WatchdogVerdict()
    if running_since is None:
        return v
    # the staleness clock starts when RUNNING starts: frames missed while idle or faulted don't count
    age_ms = (now - running_since if frame_age_s is None else min(frame_age_s, now - running_since)) * 1000.0
    if age_ms > cfg.stale_frame_ms:
        if age_ms > cfg.camera_fault_ms:
            v.fault = f"camera_stale: no fresh frame for {age_ms:.0f} ms"
            return v
        v.hold = f"stale_frame: newest frame is {age_ms:.0f} ms old"
        return v  # no frames, no chunks: the camera's watchdog governs until frames return
    since = now - (last_chunk_at if last_chunk_at is not None and last_chunk_at > running_since else running_since)
    if since * 1000.0 > cfg.inference_stop_ms:
        v.fault = f"inference_deadline: no usable action chunk for {since * 1000.0:.0f} ms"
    return v
