"""The read-only part of `panda_py.Panda` that follows from `get_pose` / `get_state`, shared by the sim
twin (sim/panda.py) and the robot process's parent side (runtime/robot_process.py)."""

from __future__ import annotations

import numpy as np

from edge_steer.franka.arm import Q_MAX, Q_MIN
from edge_steer.franka.types import RobotState
from edge_steer.geometry import mat_to_quat


class PandaQueries:
    def get_pose(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_state(self) -> RobotState:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_position(self) -> np.ndarray:
        return self.get_pose()[:3, 3].copy()

    def get_orientation(self, scalar_first: bool = False) -> np.ndarray:
        quat = mat_to_quat(self.get_pose()[:3, :3])
        return np.roll(quat, 1) if scalar_first else quat

    def get_joint_limits_lower(self) -> np.ndarray:
        return Q_MIN.copy()

    def get_joint_limits_upper(self) -> np.ndarray:
        return Q_MAX.copy()
