"""The sim's scripted expert behind the `Engine` protocol (sim only).

It lets the daemon be tested end to end independent of model quality, and it records demonstrations
on the "robot" with `record on`. The expert places its waypoints from privileged sim state; the
daemon passes the commanded target as a `runtime.*` observation key (models read `observation.*`
keys only), so its chunks are deltas relative to the commanded target, as the action contract says.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np

from edge_steer.geometry import quat_to_mat
from edge_steer.sim.expert import ScriptedExpert


class ExpertEngine:
    backend = "expert"

    def __init__(self, cell, chunk: int = 10):
        self.cell, self.chunk = cell, chunk
        self._expert: ScriptedExpert | None = None
        self._episode: int | None = None

    def predict(self, observation: Mapping[str, Any], instruction: str) -> np.ndarray:
        episode = int(observation["runtime.episode"])
        if self._expert is None or episode != self._episode:  # place the waypoints once per episode
            shim = SimpleNamespace(task=self.cell.task, world=self.cell.world, scene=self.cell.scene)
            with self.cell.world.lock:
                self._expert = ScriptedExpert(shim)
            self._episode = episode
        target = np.asarray(observation["runtime.target"], dtype=float)
        state = np.asarray(observation["observation.state"], dtype=float)
        return self._expert.chunk(target[:3], quat_to_mat(target[3:7]), state[:3], float(state[7]), self.chunk)

    def metadata(self) -> dict[str, Any]:
        return {"backend": self.backend, "task": self.cell.task.name, "chunk": self.chunk, "action_dim": 7}

    def set_steering(self, delta: Any | None) -> None:
        if delta is not None:
            raise ValueError("the scripted expert has no attention heads to steer")
