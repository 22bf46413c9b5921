"""The shared file between the daemon and the robot's process, by name: seqlocked float64 blocks whose
every field has a name (`Fields`), the text slots beside them, and the layout of the whole file.

No syscalls on the 1 kHz path: a writer bumps a block's sequence number to odd, writes, bumps it to even;
a reader copies the block and keeps the copy if the number was even and unchanged. The file is unnamed
(memfd), so nothing is left to clean up whichever way either process ends.

Blocks, one after the other:
* robot state (child writes): ROBOT, then the sim's whole qpos/qvel for the parent's mirror world;
* controller target (parent writes): TARGET;
* stop slot (parent asks, child answers): STOP;
* error text (child writes with the state, under its sequence number);
* with the setpoint stage in the child (runtime/motion.py): CHUNK, HOLD, STATUS, the executed ring, the fault text.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np


class Fields:
    """Named fields of a float64 block: `F.name` is an index (size 1) or a slice; field 0 is `seq`."""

    def __init__(self, *spec: tuple[str, int]):
        off = 0
        self._names = []
        for name, n in (("seq", 1), *spec):
            setattr(self, name, off if n == 1 else slice(off, off + n))
            self._names.append(name)
            off += n
        self.size = off

    def __repr__(self) -> str:
        return f"Fields({', '.join(self._names)}; {self.size})"


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


# ---- the robot's blocks -------------------------------------------------------------------------
# the robot's state, as the child publishes it every tick; `mode` is libfranka's RobotMode value
ROBOT = Fields(("time", 1), ("mode", 1), ("err_epoch", 1), ("tcp", 16), ("tau", 7), ("q", 7), ("dq", 7),
               ("gripper", 1))
# the parent's latest set_control: controller generation, kind (CARTESIAN / JOINT), up to 14 numbers
TARGET = Fields(("gen", 1), ("kind", 1), ("values", 14))
CARTESIAN, JOINT = 1.0, 2.0
# stop requests: `seq` is the parent's request number, `done` the last one the child did, `failed` 1 if it raised
STOP = Fields(("done", 1), ("failed", 1))
ERR_BYTES = 2048


@dataclass(frozen=True)
class RobotLayout:
    """Where the robot's blocks sit in the shared file. `nq`/`nv`: the length of the extra qpos/qvel
    published after the state (the sim publishes its whole world, for the parent's mirror; the arm none)."""
    nq: int = 0
    nv: int = 0

    @property
    def qpos(self) -> slice:
        return slice(ROBOT.size, ROBOT.size + self.nq)

    @property
    def qvel(self) -> slice:
        return slice(ROBOT.size + self.nq, ROBOT.size + self.nq + self.nv)

    @property
    def state_size(self) -> int:
        return ROBOT.size + self.nq + self.nv

    @property
    def nbytes(self) -> int:
        return (self.state_size + TARGET.size + STOP.size) * 8 + ERR_BYTES

    def buffers(self, mem) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The state, target, stop and error-text arrays, one after the other in the shared file."""
        n = self.state_size
        state = np.frombuffer(mem, dtype=np.float64, count=n)
        target = np.frombuffer(mem, dtype=np.float64, count=TARGET.size, offset=n * 8)
        stop = np.frombuffer(mem, dtype=np.float64, count=STOP.size, offset=(n + TARGET.size) * 8)
        err = np.frombuffer(mem, dtype=np.uint8, count=ERR_BYTES, offset=(n + TARGET.size + STOP.size) * 8)
        return state, target, stop, err


# ---- the setpoint stage's blocks (runtime/motion.py) ---------------------------------------------
MAX_H = 64          # longest action chunk the slot holds
RING = 128          # executed segments kept for the recorder (12.8 s at 10 Hz; it drains at 50 Hz)
FAULT_BYTES = 512
# the latest action chunk (daemon writes): its number, anchor segment, time stamps, length, actions
CHUNK = Fields(("chunk_seq", 1), ("anchor", 1), ("frame_stamp", 1), ("posted", 1), ("h", 1), ("actions", MAX_H * 7))
# the requested hold (daemon writes; not seqlocked: `seq` is the request number, written after `code`)
HOLD = Fields(("code", 1))
# what the stage publishes each tick (child writes)
STATUS = Fields(("segment", 1), ("boundary_time", 1), ("ticks", 1), ("rejected", 1), ("hold", 1),
                ("hold_applied", 1), ("missed", 1), ("fault_epoch", 1), ("p", 3), ("q", 4), ("anchor_p", 3),
                ("anchor_q", 4), ("driving", 1))
# executed segments: `seq` counts them; entry i at ring_entry(i) holds (segment, action 7)
EXECUTED = Fields(("entries", RING * 8))


def ring_entry(i: int) -> slice:
    """Where the i-th executed segment sits in the EXECUTED block: (segment, 7 action numbers)."""
    start = 1 + (i % RING) * 8
    return slice(start, start + 8)


@dataclass(frozen=True)
class MotionLayout:
    """Where the setpoint stage's blocks sit: after the robot's own, from byte `base`."""
    base: int

    @property
    def nbytes(self) -> int:
        return (CHUNK.size + HOLD.size + STATUS.size + EXECUTED.size) * 8 + FAULT_BYTES

    def buffers(self, mem) -> tuple[np.ndarray, ...]:
        """The chunk, hold, status and executed blocks and the fault text."""
        off = self.base
        out = []
        for f in (CHUNK, HOLD, STATUS, EXECUTED):
            out.append(np.frombuffer(mem, dtype=np.float64, count=f.size, offset=off))
            off += f.size * 8
        out.append(np.frombuffer(mem, dtype=np.uint8, count=FAULT_BYTES, offset=off))
        return tuple(out)


def shared_file(nbytes: int) -> int:
    """A new unnamed shared file of `nbytes` (zeroed); the caller owns the descriptor."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("edge-steer-robot")
    else:  # pragma: no cover - non-Linux
        fd = os.dup(tempfile.TemporaryFile().fileno())
    os.ftruncate(fd, nbytes)
    return fd


def map_file(fd: int) -> mmap.mmap:
    return mmap.mmap(fd, os.fstat(fd).st_size)
