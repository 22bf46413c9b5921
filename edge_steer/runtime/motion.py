"""The setpoint stage in the robot's process, and the daemon's handle on it.

In the daemon, a 1 kHz stage thread shares the interpreter's GIL with inference, the cameras, the monitor
and ZMQ; a woken FIFO thread waits for whichever thread holds the GIL, and that was most of its missed
ticks (docs/serve.md). So the stage runs in the robot's own process (runtime/robot_child.py), ticked by
its loop just before the controller and the physics, as a libfranka motion generator is called each
millisecond before its controller. The daemon keeps the state machine, watchdogs, recorder and policy,
and talks to the stage through `RemoteSetpoint`, which answers what the daemon reads of a `SetpointStage`.

The two sides share the stage's blocks of the robot's shared file (runtime/shm.py: CHUNK, HOLD, STATUS,
EXECUTED, the fault text); rare requests (re-anchor, timing) go over the robot process's socket.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from edge_steer.runtime import messages as m
from edge_steer.runtime.setpoint import Chunk, SetpointStage
from edge_steer.runtime.shm import (CHUNK, EXECUTED, HOLD, MAX_H, RING, STATUS, MotionLayout, get_text, put_text,
                                    ring_entry, seq_read, seq_write)

# Every hold the daemon or the stage sets; index 0 is "no hold" (running).
HOLDS = (None, "idle", "paused", "fault", "shutdown", "stale_frame", "rejected_setpoint",
         "controller_error")


def _hold_code(reason: str | None) -> int:
    try:
        return HOLDS.index(reason)
    except ValueError:
        raise ValueError(f"unknown hold reason {reason!r}; one of {HOLDS}") from None


# ----------------------------------------------------------------------------------------------
# Child side: the stage, ticked by the robot process's loop
# ----------------------------------------------------------------------------------------------
class MotionSide:
    """Owns a SetpointStage in the robot's process and mirrors it to and from the shared blocks.
    `tick(measured_p)` is called once per control period by the loop that owns the robot."""

    def __init__(self, stage: SetpointStage, layout: MotionLayout, mem):
        self.stage = stage
        self.chunk, self.hold, self.status, self.ring, self.fault = layout.buffers(mem)
        self._seen_chunk = 0.0          # the daemon numbers chunks from 1; slot 0 is the empty one
        self._seen_request = 0.0
        self._fault_epoch = 0

    def tick(self, measured_p) -> None:
        sp = self.stage
        sp.measured_p = measured_p
        req = self.hold[HOLD.seq]
        if req != self._seen_request:     # the daemon's hold request (one float each: no tearing)
            self._seen_request = req
            sp.hold_reason = HOLDS[int(self.hold[HOLD.code])]
        c = self.chunk
        s0 = c[CHUNK.seq]
        if c[CHUNK.chunk_seq] != self._seen_chunk and s0 % 2 == 0:
            snap = c.copy()
            if c[CHUNK.seq] == s0:   # not mid-write (else the next tick takes it)
                self._seen_chunk = snap[CHUNK.chunk_seq]
                h = int(snap[CHUNK.h])
                sp.inbox = Chunk(snap[CHUNK.actions][:7 * h].reshape(h, 7).copy(), int(snap[CHUNK.anchor]),
                                 float(snap[CHUNK.frame_stamp]), int(snap[CHUNK.chunk_seq]),
                                 posted=float(snap[CHUNK.posted]))
        sp.tick()
        reason = sp.take_fault()
        if reason is not None:
            put_text(self.fault, reason)
            self._fault_epoch += 1       # published after the text: a reader that sees it sees the text
        ring = self.ring
        for seg, action in sp.take_executed():
            n = int(ring[EXECUTED.seq])
            e = ring_entry(n)
            ring[e.start] = seg
            ring[e.start + 1:e.stop] = action
            ring[EXECUTED.seq] = n + 1          # after the entry: a reader never sees a half-written one
        self._publish()

    def _publish(self) -> None:
        sp, st = self.stage, self.status
        (p, q), (ap, aq) = sp.commanded, sp.anchor

        def write():
            st[STATUS.segment] = sp.segment
            st[STATUS.boundary_time] = sp.boundary_time
            st[STATUS.ticks] = sp.ticks
            st[STATUS.rejected] = sp.rejected
            st[STATUS.hold] = HOLDS.index(sp.hold_reason) if sp.hold_reason in HOLDS else HOLDS.index("fault")
            st[STATUS.hold_applied] = self._seen_request
            st[STATUS.missed] = sp.missed_ticks
            st[STATUS.fault_epoch] = self._fault_epoch
            st[STATUS.p] = p
            st[STATUS.q] = q
            st[STATUS.anchor_p] = ap
            st[STATUS.anchor_q] = aq
            st[STATUS.driving] = sp.driving
        seq_write(st, write)

    def request(self, req):
        """The daemon's rare requests to the stage, over the robot process's socket."""
        stage = self.stage
        if isinstance(req, m.MotionReset):
            return stage.reset(req.p, req.q)
        if isinstance(req, m.MotionTiming):
            t = stage.timing()
            t["scheduling"] = f"{t['scheduling']} (in the robot's loop, own process)"
            return t
        stage.latencies.clear()      # MotionClearTiming
        stage.handovers.clear()
        return None


# ----------------------------------------------------------------------------------------------
# Daemon side: what the daemon reads and writes of a SetpointStage
# ----------------------------------------------------------------------------------------------
def _status_field(index: int, cast) -> property:
    return property(lambda self: cast(self._snap()[index]), doc="as the stage last published it")


class RemoteSetpoint:
    """The daemon's handle on the setpoint stage running in the robot process (`MotionSide`)."""

    def __init__(self, robot, layout: MotionLayout, mem):
        self._robot = robot         # the robot process's parent side: its request socket
        self.chunk, self.hold, self.status, self.ring, self.fault = layout.buffers(mem)
        self._request = 0
        self._hold_wanted: str | None = "idle"
        self._ring_read = 0
        self._ring_lock = threading.Lock()   # the monitor and an ending episode both drain it
        self._hold_lock = threading.Lock()   # the command, monitor and policy threads all set holds
        self._fault_seen = 0.0
        self.controller = None      # the daemon's handle; the stage drives the robot side's own controller
        self.q_nullspace = np.zeros(7)
        self.measured_p = np.zeros(3)   # unused: the stage reads the robot where it runs

    # ---- slots ---------------------------------------------------------------------------------
    def _snap(self) -> np.ndarray:
        # no liveness check here (a syscall): the monitor's robot reads notice a dead robot process
        return seq_read(self.status)[1]

    @property
    def inbox(self) -> None:
        return None

    @inbox.setter
    def inbox(self, c: Chunk) -> None:
        a = np.asarray(c.actions, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != 7 or not 1 <= a.shape[0] <= MAX_H:
            raise ValueError(f"a chunk must be (1..{MAX_H}, 7), got {a.shape}")
        buf = self.chunk

        def write():
            buf[CHUNK.anchor], buf[CHUNK.frame_stamp], buf[CHUNK.posted], buf[CHUNK.h] = (
                c.anchor, c.frame_stamp, c.posted, a.shape[0])
            buf[CHUNK.actions.start:CHUNK.actions.start + a.size] = a.ravel()
            buf[CHUNK.chunk_seq] = c.seq
        seq_write(buf, write)

    @property
    def hold_reason(self) -> str | None:
        st = self._snap()
        if st[STATUS.hold_applied] < self._request:       # not applied yet: what was asked is what will be
            return self._hold_wanted
        return HOLDS[int(st[STATUS.hold])]

    @hold_reason.setter
    def hold_reason(self, reason: str | None) -> None:
        code = _hold_code(reason)
        # the GIL happens to make this body atomic today; the lock says so instead of relying on it (two
        # setters sharing one request number could leave the stage on the earlier code)
        with self._hold_lock:
            self._hold_wanted = reason
            self._request += 1
            self.hold[HOLD.code] = code
            self.hold[HOLD.seq] = self._request     # after the code: the stage reads the pair once it sees this

    segment = _status_field(STATUS.segment, int)
    boundary_time = _status_field(STATUS.boundary_time, float)
    ticks = _status_field(STATUS.ticks, int)
    rejected = _status_field(STATUS.rejected, int)
    missed_ticks = _status_field(STATUS.missed, int)
    driving = _status_field(STATUS.driving, bool)

    @property
    def commanded(self) -> tuple[list[float], tuple[float, ...]]:
        st = self._snap()
        return [float(x) for x in st[STATUS.p]], tuple(float(x) for x in st[STATUS.q])

    @property
    def anchor(self) -> tuple[list[float], tuple[float, ...]]:
        st = self._snap()
        return [float(x) for x in st[STATUS.anchor_p]], tuple(float(x) for x in st[STATUS.anchor_q])

    def wait_boundary(self, timeout: float) -> bool:
        """Block until the next segment starts (True) or `timeout` s pass (False)."""
        seg = self.segment
        end = time.perf_counter() + timeout
        while time.perf_counter() < end:
            time.sleep(0.001)
            if self.segment != seg:
                return True
        return False

    def take_executed(self) -> list[tuple[int, np.ndarray]]:
        ring = self.ring
        with self._ring_lock:
            n = int(ring[EXECUTED.seq])
            start = max(self._ring_read, n - RING)   # a reader that fell a whole ring behind loses the oldest
            out = []
            for i in range(start, n):
                e = ring[ring_entry(i)]
                out.append((int(e[0]), e[1:].copy()))
            self._ring_read = n
        return out

    def take_fault(self) -> str | None:
        st = self._snap()
        if st[STATUS.fault_epoch] == self._fault_seen:
            return None
        self._fault_seen = st[STATUS.fault_epoch]
        return get_text(self.fault)

    # ---- requests --------------------------------------------------------------------------------
    def reset(self, p, q) -> None:
        self._robot.request(m.MotionReset([float(x) for x in p], [float(x) for x in q]))

    def start(self, priority: int = 0, cpu: int = -1) -> str | None:
        # it ticks in the robot process's loop, at that loop's scheduling (libfranka's priority)
        return getattr(self._robot, "rt_refused", None)

    def stop(self) -> None:
        pass       # it stops with the robot process

    def scheduling(self) -> str:
        return self.timing().get("scheduling", "unknown")

    def timing(self) -> dict:
        return self._robot.request(m.MotionTiming())

    def clear_timing(self) -> None:
        self._robot.request(m.MotionClearTiming())
