"""The motion process: the setpoint stage and its safety filter beside the robot's 1 kHz loop.

In the daemon, the setpoint stage is a SCHED_FIFO thread that still shares the interpreter's GIL with
inference, the cameras, the monitor and ZMQ; a woken FIFO thread waits for whichever thread holds the
GIL, and that is most of its missed ticks (docs/serve.md). With `realtime.motion = "process"` it runs
instead in the robot's own process: in sim, it ticks inside SimPanda's loop (sim/panda_process.py),
just before the controller and the physics, as a libfranka motion generator is called each
millisecond before its controller. The daemon keeps the state machine, watchdogs, recorder and
policy, and talks to the stage through `RemoteSetpoint`, which answers what the daemon reads of a
`SetpointStage`.

The two sides share one memory file (no syscalls on the 1 kHz path):
* chunk slot (daemon writes, seqlocked): the latest action chunk, anchor segment and time stamps;
* control slot (daemon writes): the requested hold, tagged with a request number;
* status (child writes, seqlocked): segment, boundary time, ticks, hold, commanded and anchor pose,
  missed ticks, the last fault's text;
* executed ring (child writes): (segment, action) of every segment that ended, drained by the recorder.
Rare requests (re-anchor, timing) go over the robot process's request socket.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from edge_steer.runtime.setpoint import Chunk, SetpointStage
from edge_steer.runtime.robot_process import get_text, put_text, seq_read, seq_write

# Every hold the daemon or the stage sets; index 0 is "no hold" (running).
HOLDS = (None, "idle", "paused", "fault", "shutdown", "stale_frame", "rejected_setpoint",
         "controller_error")
MAX_H = 64          # longest action chunk the slot holds
RING = 128          # executed segments kept for the recorder (12.8 s at 10 Hz; it drains at 50 Hz)
FAULT_BYTES = 512


@dataclass(frozen=True)
class MotionLayout:
    """Offsets (in float64s) of the motion blocks, after the robot's own blocks in the shared file."""
    base: int       # byte offset where the motion blocks start

    # chunk slot: [lock, seq, anchor, frame_stamp, posted, h, actions (MAX_H x 7)]
    chunk_size = 6 + MAX_H * 7
    # control slot: [request number, hold code]
    control_size = 2
    # status: [lock, segment, boundary_time, ticks, rejected, hold, hold request applied, missed,
    #          fault_epoch, p(3), q(4), anchor p(3), anchor q(4), driving a controller]
    status_size = 9 + 14 + 1
    # executed ring: [count, then RING x (segment, action 7)]
    ring_size = 1 + RING * 8

    @property
    def nbytes(self) -> int:
        return (self.chunk_size + self.control_size + self.status_size + self.ring_size) * 8 + FAULT_BYTES

    def buffers(self, mem) -> tuple[np.ndarray, ...]:
        off = self.base
        out = []
        for n in (self.chunk_size, self.control_size, self.status_size, self.ring_size):
            out.append(np.frombuffer(mem, dtype=np.float64, count=n, offset=off))
            off += n * 8
        out.append(np.frombuffer(mem, dtype=np.uint8, count=FAULT_BYTES, offset=off))
        return tuple(out)


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
        self.chunk, self.control, self.status, self.ring, self.fault = layout.buffers(mem)
        self._seen_chunk = 0.0          # the daemon numbers chunks from 1; slot 0 is the empty one
        self._seen_request = 0.0
        self._fault_epoch = 0

    def tick(self, measured_p) -> None:
        sp = self.stage
        sp.measured_p = measured_p
        req = self.control[0]
        if req != self._seen_request:     # the daemon's hold request (one float each: no tearing)
            self._seen_request = req
            sp.hold_reason = HOLDS[int(self.control[1])]
        c = self.chunk
        s0 = c[0]
        if c[1] != self._seen_chunk and s0 % 2 == 0:
            snap = c.copy()
            if c[0] == s0:   # not mid-write (else the next tick takes it)
                self._seen_chunk = snap[1]
                h = int(snap[5])
                sp.inbox = Chunk(snap[6:6 + 7 * h].reshape(h, 7).copy(), int(snap[2]), float(snap[3]),
                                 int(snap[1]), posted=float(snap[4]))
        sp.tick()
        reason = sp.take_fault()
        if reason is not None:
            put_text(self.fault, reason)
            self._fault_epoch += 1       # published after the text: a reader that sees it sees the text
        ring = self.ring
        for seg, action in sp.take_executed():
            n = int(ring[0])
            slot = 1 + (n % RING) * 8
            ring[slot] = seg
            ring[slot + 1:slot + 8] = action
            ring[0] = n + 1          # after the entry: a reader never sees a half-written one
        self._publish()

    def _publish(self) -> None:
        sp, st = self.stage, self.status
        (p, q), (ap, aq) = sp.commanded, sp.anchor

        def write():
            st[1] = sp.segment
            st[2] = sp.boundary_time
            st[3] = sp.ticks
            st[4] = sp.rejected
            st[5] = HOLDS.index(sp.hold_reason) if sp.hold_reason in HOLDS else HOLDS.index("fault")
            st[6] = self._seen_request
            st[7] = sp.missed_ticks
            st[8] = self._fault_epoch
            st[9:12] = p
            st[12:16] = q
            st[16:19] = ap
            st[19:23] = aq
            st[23] = sp.driving
        seq_write(st, write)


# ----------------------------------------------------------------------------------------------
# Daemon side: what the daemon reads and writes of a SetpointStage
# ----------------------------------------------------------------------------------------------
def _status_field(index: int, cast) -> property:
    return property(lambda self: cast(self._snap()[index]), doc=f"status[{index}], as the stage last published it")


class RemoteSetpoint:
    """The daemon's handle on the setpoint stage running in the robot process (`MotionSide`)."""

    def __init__(self, robot, layout: MotionLayout, mem):
        self._robot = robot         # the robot process's parent side: its request socket
        self.chunk, self.control, self.status, self.ring, self.fault = layout.buffers(mem)
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
            buf[2], buf[3], buf[4], buf[5] = c.anchor, c.frame_stamp, c.posted, a.shape[0]
            buf[6:6 + a.size] = a.ravel()
            buf[1] = c.seq
        seq_write(buf, write)

    @property
    def hold_reason(self) -> str | None:
        st = self._snap()
        if st[6] < self._request:       # not applied yet: what was asked is what will be
            return self._hold_wanted
        return HOLDS[int(st[5])]

    @hold_reason.setter
    def hold_reason(self, reason: str | None) -> None:
        code = _hold_code(reason)
        # the GIL happens to make this body atomic today; the lock says so instead of relying on it (two
        # setters sharing one request number could leave the stage on the earlier code)
        with self._hold_lock:
            self._hold_wanted = reason
            self._request += 1
            self.control[1] = code
            self.control[0] = self._request     # after the code: the stage reads the pair once it sees this

    segment = _status_field(1, int)
    boundary_time = _status_field(2, float)
    ticks = _status_field(3, int)
    rejected = _status_field(4, int)
    missed_ticks = _status_field(7, int)
    driving = _status_field(23, bool)

    @property
    def commanded(self) -> tuple[list[float], tuple[float, ...]]:
        st = self._snap()
        return [float(x) for x in st[9:12]], tuple(float(x) for x in st[12:16])

    @property
    def anchor(self) -> tuple[list[float], tuple[float, ...]]:
        st = self._snap()
        return [float(x) for x in st[16:19]], tuple(float(x) for x in st[19:23])

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
            n = int(ring[0])
            start = max(self._ring_read, n - RING)   # a reader that fell a whole ring behind loses the oldest
            out = []
            for i in range(start, n):
                slot = 1 + (i % RING) * 8      # as MotionSide.tick writes it
                out.append((int(ring[slot]), ring[slot + 1:slot + 8].copy()))
            self._ring_read = n
        return out

    def take_fault(self) -> str | None:
        st = self._snap()
        if st[8] == self._fault_seen:
            return None
        self._fault_seen = st[8]
        return get_text(self.fault)

    # ---- requests --------------------------------------------------------------------------------
    def reset(self, p, q) -> None:
        self._robot._rpc("motion_reset", [float(x) for x in p], [float(x) for x in q])

    def start(self, priority: int = 0, cpu: int = -1) -> str | None:
        # it ticks in the robot process's loop, at that loop's scheduling (libfranka's priority)
        return getattr(self._robot, "rt_refused", None)

    def stop(self) -> None:
        pass       # it stops with the robot process

    def scheduling(self) -> str:
        return self.timing().get("scheduling", "unknown")

    def timing(self) -> dict:
        return self._robot._rpc("motion_timing")

    def clear_timing(self) -> None:
        self._robot._rpc("motion_clear_timing")
