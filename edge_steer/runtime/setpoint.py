"""The setpoint stage: action chunks in, 1 kHz CartesianImpedance targets out.

Time is counted in *segments* of 1/action_hz (one chunk action each) split into control ticks.
A chunk is anchored at the segment during which its frames were captured: its action i belongs to
segment anchor + i and, per the action contract (`edge_steer.contract`), moves the commanded target
from where segment anchor + i starts. So a chunk can take effect the tick after it arrives — it
re-aims the current segment's end and the raw target glides there over the segment's remaining
ticks — and hand-over needs no blending: deltas apply to the target actually commanded, so the raw
target is continuous and the safety filter bounds the velocity change.

With `ensemble` on, a segment's action is ACT's temporal ensemble of every live chunk covering it.
When no chunk covers the current segment (inference late) or a hold is requested, the raw target
becomes the filter's braking point and the arm stops within the acceleration limit.

The loop is lean: it reads slots other threads write, does float arithmetic on preallocated
lists, and calls the controller's setter; the per-segment planning (10 Hz) does the numpy work.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from edge_steer.geometry import mat_to_quat, quat_to_mat
from edge_steer.contract import advance_target, ensemble_actions
from edge_steer.realtime import DurationHistogram, LoopStats, scheduling
from edge_steer.runtime.config import RatesConfig
from edge_steer.runtime.safety import SafetyFilter, qconj, qexp, qlog, qmul


@dataclass(frozen=True)
class Chunk:
    actions: np.ndarray        # (H, 7) float64, finite (checked by the policy stage)
    anchor: int                # segment index at capture time
    frame_stamp: float         # wall-clock capture time of the oldest frame used
    seq: int
    posted: float = 0.0        # wall-clock time the policy stage handed it over (0: unknown)


class SetpointStage:
    def __init__(self, rates: RatesConfig, filt: SafetyFilter, gripper_cmd):
        self.rates = rates
        self.filter = filt
        self.dt = 1.0 / rates.control_hz
        self.ticks_per_seg = rates.control_hz // rates.action_hz
        self._gripper_cmd = gripper_cmd          # callable(close: bool), non-blocking
        self.fault_pending: str | None = None    # a fault seen on this thread; the monitor raises it
        self.controller = None                   # set by the daemon while a controller runs
        self.q_nullspace = np.zeros(7)
        # slots written by other threads, read each tick
        self.inbox: Chunk | None = None
        self.hold_reason: str | None = "idle"
        self.measured_p = np.zeros(3)
        # loop state (owned by the loop thread)
        self.segment = 0
        self._tick = 0
        self._seen_seq = -1
        self._chunks: deque[Chunk] = deque(maxlen=16)
        self._holding = True
        self._anchor_p = [0.0, 0.0, 0.0]
        self._anchor_q = (0.0, 0.0, 0.0, 1.0)
        self._raw_p = [0.0, 0.0, 0.0]
        self._raw_q = (0.0, 0.0, 0.0, 1.0)
        self._up = [0.0, 0.0, 0.0]
        self._uw = (0.0, 0.0, 0.0)
        self._left = 0
        self._seg_action: np.ndarray | None = None
        self._pending: Chunk | None = None       # the newest chunk, until its first setpoint
        self._pos = np.zeros(3)
        self._quat = np.array([0.0, 0.0, 0.0, 1.0])
        # outputs for telemetry / recording / watchdogs
        self.boundary = threading.Event()        # set at every segment start (the policy stage aligns to it)
        self.boundary_time = 0.0
        self.last_chunk_used_at: float | None = None  # perf_counter of the last tick a chunk drove
        self.executed: deque[tuple[int, np.ndarray]] = deque(maxlen=64)  # (segment, action) once it ended
        self.loop = LoopStats()                   # period error, tick time, missed ticks
        self.latencies = DurationHistogram()      # frame capture -> first setpoint using it
        self.handovers = DurationHistogram()      # chunk posted -> first setpoint using it
        self.ticks = 0
        self.rejected = 0
        self._reset_request: tuple | None = None
        self._driver: threading.Thread | None = None

    # ---- control from other threads --------------------------------------------------------
    def reset(self, p, q) -> None:
        """Re-anchor at a measured pose (start, recover). Applied by the loop at its next tick."""
        self._reset_request = (list(map(float, p)), tuple(map(float, q)))

    def attach(self, thread, stats: LoopStats) -> None:
        """Be ticked by `thread`'s loop, the stage's one owner (the robot process's, runtime/robot_child.py):
        that thread's scheduling and its statistics are then this stage's."""
        self._driver, self.loop = thread, stats

    def scheduling(self) -> str:
        return scheduling(self._driver)

    # ---- the loop ------------------------------------------------------------------------------
    def tick(self) -> None:
        """One control tick: called by the robot process's 1 kHz loop (and by tests directly)."""
        self.ticks += 1
        req = self._reset_request
        if req is not None:
            self._reset_request = None
            self.filter.reset(*req)
            self._raw_p, self._raw_q = list(req[0]), self.filter.q
            self._anchor_p, self._anchor_q = list(req[0]), self.filter.q
            self._left = 0
            self._chunks.clear()
            self._holding = True
        # segment clock
        self._tick += 1
        boundary = self._tick >= self.ticks_per_seg
        if boundary:
            if self._seg_action is not None:
                self.executed.append((self.segment, self._seg_action))
            self._seg_action = None
            self._tick = 0
            self.segment += 1
            self._anchor_p, self._anchor_q = list(self._raw_p), self._raw_q
            self._left = 0
            self.boundary_time = time.perf_counter()
            self.boundary.set()
        hold = self.hold_reason
        if hold is not None:
            if not self._holding:
                self._enter_hold()
        else:
            new = self.inbox
            fresh = new is not None and new.seq != self._seen_seq
            if fresh:
                self._seen_seq = new.seq
                self._chunks.append(new)
                self._pending = new
            if self._holding:
                if boundary or self._left == 0 and fresh:
                    self._holding = False
                    self._plan()
            elif boundary or fresh:
                self._plan()
        # interpolate the raw target
        if self._left > 0:
            self._left -= 1
            rp, up = self._raw_p, self._up
            rp[0] += up[0]
            rp[1] += up[1]
            rp[2] += up[2]
            uw = self._uw
            self._raw_q = qmul(qexp(uw[0], uw[1], uw[2]), self._raw_q)
            ff_p, ff_w = up, uw
        else:
            ff_p, ff_w = (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)
        f = self.filter
        if not f.apply(self._raw_p, self._raw_q, ff_p, ff_w):
            self.rejected += 1
            self.hold_reason = "rejected_setpoint"
            self.fault_pending = "safety: non-finite or invalid setpoint rejected"
        ctrl = self.controller
        if ctrl is not None:
            pos, quat = self._pos, self._quat
            pos[0], pos[1], pos[2] = f.p
            quat[0], quat[1], quat[2], quat[3] = f.q
            try:
                ctrl.set_control(pos, quat, self.q_nullspace)
            except Exception as e:  # noqa: BLE001 - e.g. the robot side dropped the controller
                self.controller = None
                self.hold_reason = "controller_error"
                self.fault_pending = f"controller: {e!r}"
            pending = self._pending
            if pending is not None and not self._holding:
                now = time.time()
                self.latencies.add(now - pending.frame_stamp)
                if pending.posted:
                    self.handovers.add(now - pending.posted)
                self._pending = None

    def _enter_hold(self) -> None:
        bp, bq = self.filter.brake_target()
        self._raw_p, self._raw_q = list(bp), bq
        self._anchor_p, self._anchor_q = list(bp), bq
        self._left = 0
        self._chunks.clear()
        self._seg_action = None
        self._pending = None
        self._holding = True

    def _select(self, seg: int) -> np.ndarray | None:
        """The action for segment `seg`: the newest covering chunk's, or ACT's ensemble of all of them."""
        h = self.rates.execute_horizon
        live = [(c, seg - c.anchor) for c in self._chunks if 0 <= seg - c.anchor < min(h, len(c.actions))]
        if not live:
            return None
        if not self.rates.ensemble or len(live) == 1:
            c, i = live[-1]
            return c.actions[i]
        return ensemble_actions([c.actions[i] for c, i in live], self.rates.ensemble_decay)

    def _plan(self) -> None:
        a = self._select(self.segment)
        if a is None:  # nothing covers this segment: glide to a stop where we are
            if self._seg_action is not None or self._left > 0:
                self._enter_hold()
                self._holding = False  # not a requested hold: resume as soon as a chunk covers a segment
            return
        self.last_chunk_used_at = time.perf_counter()
        self._seg_action = a
        self._gripper_cmd(bool(a[6] >= 0.5))
        tp = np.array(self._anchor_p)
        tr = quat_to_mat(np.array(self._anchor_q))
        p1, r1 = advance_target(tp, tr, np.asarray(a, dtype=np.float64), self.measured_p)
        q1 = mat_to_quat(r1)
        left = self.ticks_per_seg - self._tick
        self._left = left
        rp = self._raw_p
        self._up = [(float(p1[i]) - rp[i]) / left for i in range(3)]
        w = qlog(qmul((float(q1[0]), float(q1[1]), float(q1[2]), float(q1[3])), qconj(self._raw_q)))
        self._uw = (w[0] / left, w[1] / left, w[2] / left)

    # ---- what the daemon reads (runtime/motion.py's RemoteSetpoint answers the same) ----------
    def wait_boundary(self, timeout: float) -> bool:
        """Block until the next segment starts (True) or `timeout` s pass (False)."""
        self.boundary.clear()
        return self.boundary.wait(timeout)

    def take_executed(self) -> list[tuple[int, np.ndarray]]:
        out = []
        while self.executed:
            out.append(self.executed.popleft())
        return out

    def take_fault(self) -> str | None:
        reason, self.fault_pending = self.fault_pending, None
        return reason

    @property
    def commanded(self) -> tuple[list[float], tuple[float, ...]]:
        return list(self.filter.p), self.filter.q

    @property
    def anchor(self) -> tuple[list[float], tuple[float, ...]]:
        return list(self._anchor_p), self._anchor_q

    @property
    def driving(self) -> bool:
        """Whether a controller takes this stage's setpoints (it drops it when the setter raises)."""
        return self.controller is not None

    @property
    def missed_ticks(self) -> int:
        return self.loop.missed_ticks

    def clear_timing(self) -> None:
        self.loop.clear()
        self.latencies.clear()
        self.handovers.clear()

    # ---- statistics -----------------------------------------------------------------------------
    def timing(self) -> dict:
        # the stage's own tick count (tests drive tick() without the loop) wins over the loop's
        return {**self.loop.summary(), "ticks": self.ticks, "missed_ticks": self.loop.missed_ticks,
                "rejected": self.rejected, "scheduling": self.scheduling(),
                **self.latencies.summary("latency_ms", 1e-3), **self.handovers.summary("handover_ms", 1e-3)}


def is_finite_chunk(a: np.ndarray) -> bool:
    return bool(a.ndim == 2 and a.shape[0] >= 1 and a.shape[1] == 7 and np.all(np.isfinite(a)))
