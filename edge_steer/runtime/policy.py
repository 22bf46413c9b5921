"""The policy stage: on fresh frames at the policy rate, the engine's action chunk into the setpoint port.

It runs only while an episode is live (`Episode`, published by the daemon as one attribute: the
stage never reads the state machine) and reports back through two callbacks: `fault(reason)` for an
engine that raises or returns an invalid chunk, `on_chunk(segment, observation)` for the recorder.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_steer.runtime.config import ServeConfig
from edge_steer.runtime.setpoint import Chunk, is_finite_chunk
from edge_steer.runtime.telemetry import TimingWindow

log = logging.getLogger("edge_steer.serve")


@dataclass(frozen=True)
class Episode:
    """A live episode as the policy stage sees it."""
    number: int
    instruction: str
    plant: Any                 # runtime.plant.Plant
    start_segment: int         # segments are counted from here for the policy rate


def observation(frames, r, anchor, episode: int) -> dict[str, Any]:
    """The model's input from the frames and a robot reading (plus the commanded target, for engines
    that plan from it, as the sim's expert does; models ignore runtime.*)."""
    from edge_steer.contract import tcp_state
    from edge_steer.geometry import quat_to_mat
    obs: dict[str, Any] = {f"observation.images.{n}": f.image for n, f in frames.items()}
    obs["observation.state"] = tcp_state(r.position, quat_to_mat(r.quat), r.gripper_width)
    obs["observation.joints"] = r.q.astype(np.float32)
    p, q = anchor
    obs["runtime.target"] = np.array([*p, *q])
    obs["runtime.episode"] = episode
    return obs


class PolicyStage:
    def __init__(self, cfg: ServeConfig, engine, engine_lock: threading.Lock, current: Callable[[], Episode | None],
                 fault: Callable[[str], None], on_chunk: Callable[[int, dict], None]):
        self.cfg, self.engine, self.engine_lock = cfg, engine, engine_lock
        self._current, self._fault, self._on_chunk = current, fault, on_chunk
        self.chunks_made = 0
        self.chunks_dropped = 0
        self.inference_ms = TimingWindow()
        self.frame_to_policy_ms = TimingWindow()   # oldest frame's capture -> all frames in the policy's hands
        self.latest_chunk: np.ndarray | None = None
        self.last_chunk_at: float | None = None    # perf_counter of the last usable chunk (the watchdog's)
        self._running = False
        self._thread: threading.Thread | None = None

    def warm_up(self) -> None:
        """One inference before serving, so the first real one meets its deadline."""
        if getattr(self.engine, "backend", "") == "expert":
            return
        obs: dict[str, Any] = {f"observation.images.{c.name}": np.zeros((c.height, c.width, 3), np.uint8)
                               for c in self.cfg.cameras}
        obs["observation.state"] = np.array([0.4, 0, 0.3, 1, 0, 0, 0, 0.08], np.float32)
        obs["observation.joints"] = np.zeros(7, np.float32)
        obs.update({"runtime.target": np.array([0.4, 0, 0.3, 1, 0, 0, 0]), "runtime.episode": 0})
        with self.engine_lock:
            self.engine.predict(obs, "warm up")

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="policy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def clear_timing(self) -> None:
        self.frame_to_policy_ms.clear()
        self.inference_ms.clear()

    def _loop(self) -> None:
        rates, safety = self.cfg.rates, self.cfg.safety
        every = max(1, round(rates.action_hz / rates.policy_hz))
        stale_s = safety.stale_frame_ms / 1000.0
        deadline_s = safety.inference_deadline_ms / 1000.0
        seq = 0
        while self._running:
            ep = self._current()
            if ep is None or ep.plant.setpoint.hold_reason is not None:
                time.sleep(0.005)
                continue
            sp = ep.plant.setpoint
            if not sp.wait_boundary(0.5):
                continue
            seg, t_b = sp.segment, sp.boundary_time
            if (seg - ep.start_segment) % every:
                continue
            frames = ep.plant.cameras.wait_fresh(after=t_b, timeout=stale_s)
            if frames is None or self._current() is not ep:
                continue
            stamp = min(f.stamp for f in frames.values())
            self.frame_to_policy_ms.add((time.time() - stamp) * 1e3)
            try:
                obs = observation(frames, ep.plant.read(), sp.anchor, ep.number)
                t0 = time.perf_counter()
                with self.engine_lock:
                    actions = self.engine.predict(obs, ep.instruction)
                self.inference_ms.add((time.perf_counter() - t0) * 1e3)
                actions = np.asarray(actions, dtype=np.float64)
            except Exception as e:  # noqa: BLE001 - an engine that raises moves nothing
                self._fault(f"engine: {type(e).__name__}: {e}")
                continue
            if not is_finite_chunk(actions):
                self._fault(f"engine returned an invalid chunk (shape {actions.shape}, finite={np.isfinite(actions).all()})")
                continue
            if time.time() - stamp > deadline_s:
                self.chunks_dropped += 1
                log.warning("chunk dropped: %.0f ms from frame to chunk exceeds the inference deadline",
                            (time.time() - stamp) * 1e3)
                continue
            if self._current() is not ep:
                continue  # paused, stopped or re-instructed while inferring
            seq += 1
            sp.inbox = Chunk(actions, seg, stamp, seq, posted=time.time())
            self.last_chunk_at = time.perf_counter()
            self.chunks_made += 1
            self.latest_chunk = actions
            self._on_chunk(seg, obs)
