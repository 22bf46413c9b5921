"""Open/close the Franka Hand without blocking the caller (the setpoint stage's 1 kHz tick, the daemon)."""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("edge_steer.serve.robot")


class GripperDriver:
    """Open/close without blocking the caller. Sim: SimGripper's async calls. Hardware: libfranka's
    gripper calls block for the whole motion, so a worker thread runs the latest request."""

    def __init__(self, gripper: Any, grasp_force: float, asynchronous: bool):
        self._g, self._force, self._async = gripper, grasp_force, asynchronous
        self.closed = False
        self.width = 0.08
        self._want: bool | None = None
        self._cv = threading.Condition()
        self._running = True
        self._thread = None
        if not asynchronous:
            self._thread = threading.Thread(target=self._worker, name="gripper", daemon=True)
            self._thread.start()

    def command(self, close: bool) -> None:
        if close == self.closed:
            return
        self.closed = close
        if self._async:
            self._do(close)
        else:
            with self._cv:
                self._want = close
                self._cv.notify()

    def _do(self, close: bool) -> None:
        if close:  # grasp "anything between 0 and 8 cm", as the sim env and the demos do
            fn = self._g.grasp_async if self._async else self._g.grasp
            fn(0.04, 0.1, self._force, 0.04, 0.04)
        else:
            fn = self._g.move_async if self._async else self._g.move
            fn(0.08, 0.1)

    def _worker(self) -> None:
        while self._running:
            with self._cv:
                self._cv.wait_for(lambda: self._want is not None or not self._running, timeout=0.2)
                want, self._want = self._want, None
            if want is not None:
                try:
                    self._do(want)
                except Exception as e:  # noqa: BLE001 - reported, the arm side decides
                    log.error("gripper command failed: %s", e)
            try:
                self.width = float(self._g.read_once().width)
            except Exception:  # noqa: BLE001
                pass

    def read_width(self) -> float:
        if self._async:
            self.width = float(self._g.read_once().width)
        return self.width

    def close(self) -> None:
        self._running = False
        if self._thread is not None:
            with self._cv:
                self._cv.notify()
            self._thread.join(timeout=2.0)
