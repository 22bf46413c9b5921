"""The sim's scripted expert behind the `Engine` protocol (sim only).

It lets the daemon be tested end to end independent of model quality, and it records demonstrations
on the "robot" with `record on`. The expert plans from privileged sim state; the daemon passes the
commanded target and the step count as `runtime.*` observation keys (models read `observation.*`
keys only), so its chunks are deltas relative to the commanded target, as the action contract says.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np

from edge_steer.geometry import mat_to_rotvec, quat_to_mat
from edge_steer.sim.env import EnvConfig
from edge_steer.sim.expert import ScriptedExpert


class ExpertEngine:
    backend = "expert"

    def __init__(self, cell, chunk: int = 10, fps: int = 10):
        self.cell, self.chunk, self.fps = cell, chunk, fps
        self._expert: ScriptedExpert | None = None
        self._episode: int | None = None

    def predict(self, observation: Mapping[str, Any], instruction: str) -> np.ndarray:
        step = int(observation["runtime.step"])
        episode = int(observation["runtime.episode"])
        if self._expert is None or episode != self._episode:  # plan once per episode, from where the arm is
            shim = SimpleNamespace(task=self.cell.task, world=self.cell.world, scene=self.cell.scene,
                                   config=EnvConfig(fps=self.fps))
            with self.cell.world.lock:
                self._expert = ScriptedExpert(shim)
            self._episode = episode
        target = np.asarray(observation["runtime.target"], dtype=float)
        p, r = target[:3], quat_to_mat(target[3:7])
        dt = 1.0 / self.fps
        out = np.zeros((self.chunk, 7))
        for i in range(self.chunk):
            pg, rg, grip = self._expert.pose_at((step + i + 1) * dt)
            out[i, :3] = pg - p
            out[i, 3:6] = mat_to_rotvec(rg @ r.T)
            out[i, 6] = grip
            p, r = pg, rg
        return out

    def metadata(self) -> dict[str, Any]:
        return {"backend": self.backend, "task": self.cell.task.name, "chunk": self.chunk, "action_dim": 7}

    def set_steering(self, delta: Any | None) -> None:
        if delta is not None:
            raise ValueError("the scripted expert has no attention heads to steer")
