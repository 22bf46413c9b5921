"""The reliability harness's probe on the setpoint stage in the robot's process: it records every pose a
controller is set to, and can make the stage's next set_control raise. Installed into the robot child
through Hello.hooks (`SimPandaProcess(..., hooks=(HOOK,))`, `open_robot(..., hooks=(HOOK,))`); the
functions below are the parent's side. Production modules know nothing of it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

HOOK = "edge_steer.testing.setpoint_probe:install"


@dataclass(frozen=True)
class RecordSetpoints:
    capacity: int


@dataclass(frozen=True)
class TakeSetpoints:
    pass


@dataclass(frozen=True)
class FailSetter:
    message: str


class SetpointRecorder:
    """Every pose a controller is set to (t, controller number, x y z, qx qy qz qw). Preallocated: the
    1 kHz tick only copies a row."""

    def __init__(self, capacity: int):
        self.buf = np.zeros((int(capacity), 9))
        self.n = self.taken = self.gen = 0
        self.overflow = False

    def record(self, gen: int, position, orientation) -> None:
        if self.n < len(self.buf):
            row = self.buf[self.n]
            row[0], row[1], row[2:5], row[5:9] = time.perf_counter(), gen, position, orientation
            self.n += 1
        else:
            self.overflow = True

    def extend(self, rows: np.ndarray, overflow: bool) -> None:
        """Rows recorded elsewhere (the robot process's), appended as far as they fit."""
        k = min(len(rows), len(self.buf) - self.n)
        self.buf[self.n:self.n + k] = rows[:k]
        self.n += k
        self.overflow |= bool(overflow) or k < len(rows)
        if self.n:
            self.gen = int(self.buf[:self.n, 1].max())

    def take(self) -> tuple[np.ndarray, bool]:
        rows = self.buf[self.taken:self.n].copy()
        self.taken = self.n
        return rows, self.overflow


class RecordedController:
    """`inner` (anything with a Cartesian set_control) with every target recorded, as one new controller."""

    def __init__(self, inner, rec: SetpointRecorder):
        rec.gen += 1
        self._inner, self._rec, self._gen = inner, rec, rec.gen

    def set_control(self, position, orientation, q_nullspace):
        self._rec.record(self._gen, position, orientation)
        self._inner.set_control(position, orientation, q_nullspace)


class FailingSetter:
    """A controller whose setter raises, as panda-py's does once libfranka dropped the controller."""

    def __init__(self, message: str):
        self._message = message

    def set_control(self, *_):
        raise RuntimeError(self._message)


def install(child) -> None:
    """The hook (runtime/robot_child.py's Hello.hooks): answer the probe's requests in `child`."""
    state: dict = {"rec": None}

    def record(req: RecordSetpoints):
        rec = state["rec"] = SetpointRecorder(req.capacity)
        child.wrap_controller(lambda ctrl: RecordedController(ctrl, rec))

    def fail(req: FailSetter):
        stage = child.motion.stage if child.motion is not None else None
        if stage is None or stage.controller is None:
            raise ValueError("no controller is driven by a stage here")
        stage.controller = FailingSetter(req.message)

    child.add_handler(RecordSetpoints, record)
    child.add_handler(TakeSetpoints, lambda req: state["rec"].take())
    child.add_handler(FailSetter, fail)


# ---- the parent's side -------------------------------------------------------------------------------
def record_setpoints(robot, capacity: int = 1 << 20) -> None:
    """From now on, record every pose the stage in `robot`'s process sets."""
    robot.request(RecordSetpoints(int(capacity)))


def take_setpoints(robot) -> tuple[np.ndarray, bool]:
    """(rows t, controller, x, y, z, qx, qy, qz, qw since the last take, whether the record overflowed)."""
    return robot.request(TakeSetpoints())


def fail_setter(robot, message: str) -> None:
    """Make the stage's next set_control raise `message`, as once the robot side dropped the controller."""
    robot.request(FailSetter(str(message)))
