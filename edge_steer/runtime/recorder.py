"""`record on`: episodes from the running daemon into a LeRobot dataset (edge_steer.data).

The policy stage hands each observation, and the setpoint stage each executed action, over a bounded
queue; this thread pairs them by segment and owns the DatasetWriter (single writer, crash-safe: an
episode reaches disk only when it ends, so a killed daemon never leaves half an episode).
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("edge_steer.serve.record")


class Recorder:
    def __init__(self, root: str | Path, cameras: list[str], image_size: int, fps: int):
        self.root = Path(root)
        self.cameras, self.image_size, self.fps = cameras, image_size, fps
        self._q: queue.Queue = queue.Queue(maxsize=256)
        self.dropped = 0
        self.saved_episodes = 0
        self.frames_in_episode = 0
        self.last_error: str | None = None
        self._writer = None
        self._thread = threading.Thread(target=self._loop, name="recorder", daemon=True)
        self._thread.start()

    # ---- producers (any thread; never block) -------------------------------------------------
    def _put(self, item: tuple) -> None:
        try:
            self._q.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def begin(self, instruction: str, meta: dict[str, Any]) -> None:
        self._put(("begin", instruction, meta))

    def observation(self, segment: int, obs: dict[str, np.ndarray]) -> None:
        self._put(("obs", segment, obs))

    def action(self, segment: int, action: np.ndarray) -> None:
        self._put(("act", segment, action))

    def end(self, success: bool | None, reason: str) -> None:
        self._put(("end", success, reason))

    def abort(self, reason: str) -> None:
        self._put(("abort", reason))

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued (an open episode is committed by `end` before this, or dropped)."""
        self._q.put(("close",))
        self._thread.join(timeout)

    # ---- the writer thread ----------------------------------------------------------------------
    def _spec(self):
        from edge_steer.data import DatasetSpec, Feature, default_spec
        base = default_spec(self.image_size, self.fps)
        img = Feature("image", (self.image_size, self.image_size, 3), ["height", "width", "channels"])
        feats = {f"observation.images.{c}": img for c in self.cameras}
        feats.update({k: v for k, v in base.features.items() if not v.is_image})
        return DatasetSpec(self.fps, feats, base.robot_type)

    def _frame(self, obs: dict[str, np.ndarray], action: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for c in self.cameras:
            img = obs[f"observation.images.{c}"]
            if img.shape[:2] != (self.image_size, self.image_size):
                from PIL import Image
                img = np.asarray(Image.fromarray(img).resize((self.image_size, self.image_size), Image.BILINEAR))
            out[f"observation.images.{c}"] = img
        out["observation.state"] = obs["observation.state"]
        out["observation.joints"] = obs["observation.joints"]
        out["action"] = np.asarray(action, dtype=np.float32)
        return out

    def _loop(self) -> None:
        from edge_steer.data import DatasetWriter
        instruction, meta = None, {}
        obs: dict[int, dict] = {}
        acts: dict[int, np.ndarray] = {}
        while True:
            item = self._q.get()
            kind = item[0]
            try:
                if kind == "close":
                    if self._writer is not None:
                        self._writer.close()
                        self._writer = None
                    return
                if kind == "begin":
                    if self._writer is None:
                        self._writer = DatasetWriter(self.root, self._spec())
                    if self._writer.in_episode:
                        self._writer.abort_episode()
                    self._writer.begin_episode()
                    instruction, meta, obs, acts = item[1], item[2], {}, {}
                    self.frames_in_episode = 0
                elif self._writer is None or not self._writer.in_episode:
                    continue
                elif kind == "obs":
                    obs[item[1]] = item[2]
                elif kind == "act":
                    acts[item[1]] = item[2]
                elif kind == "end":
                    success, reason = item[1], item[2]
                    self._flush(obs, acts, instruction)
                    if self.frames_in_episode:
                        idx = self._writer.end_episode(success=success, extra={**meta, "end_reason": reason})
                        self.saved_episodes += 1
                        log.info("recorded episode %d (%d frames, %s) in %s", idx, self.frames_in_episode,
                                 reason, self.root)
                    else:
                        self._writer.abort_episode()
                    obs, acts = {}, {}
                elif kind == "abort":
                    self._writer.abort_episode()
                    log.info("recording: episode discarded (%s)", item[1])
                    obs, acts = {}, {}
                if kind in ("obs", "act"):
                    self._flush(obs, acts, instruction)
            except Exception as e:  # noqa: BLE001 - recording must never take the daemon down
                self.last_error = f"{type(e).__name__}: {e}"
                log.error("recording failed: %s", self.last_error)
                if self._writer is not None and self._writer.in_episode:
                    self._writer.abort_episode()

    def _flush(self, obs: dict, acts: dict, instruction: str | None) -> None:
        for seg in sorted(set(obs) & set(acts)):
            self._writer.add_frame(self._frame(obs.pop(seg), acts.pop(seg)), task=instruction or "unknown")
            self.frames_in_episode += 1
        if acts and obs:  # actions of segments without an observation (policy_hz < action_hz) are dropped
            horizon = max(obs)
            for seg in [s for s in acts if s < horizon]:
                acts.pop(seg)
