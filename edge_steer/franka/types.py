"""Twins of the value types panda-py 1.1 hands back (`panda_py.libfranka`), with the same names, field
types and behaviour: RobotState's fields are lists (O_T_EE column-major), its `time` a Duration, its
`robot_mode` a RobotMode, its `current_errors` an Errors; GripperState's `time` a Duration. The sim twin
and the robot process's parent side answer with these, so code written against panda-py reads them the
same way (tests/test_panda_conformance.py checks them against the installed panda_py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_steer.franka.arm import F_T_EE


class RobotError(RuntimeError):
    """The runtime's word for a robot that cannot be reached or used (connection, start, lost process)."""


class ControlException(RuntimeError):
    """libfranka's ControlException (panda-py raises it as RuntimeError's subclass): the control loop
    faulted (a reflex)."""


class RobotMode(enum.Enum):
    """libfranka.RobotMode: same names and values."""
    kOther = 0
    kIdle = 1
    kMove = 2
    kGuiding = 3
    kReflex = 4
    kUserStopped = 5
    kAutomaticErrorRecovery = 6


class RealtimeConfig(enum.Enum):
    """libfranka.RealtimeConfig: same names and values."""
    kEnforce = 0
    kIgnore = 1


class Duration:
    """libfranka.Duration: whole milliseconds."""

    def __init__(self, milliseconds: int = 0):
        self._ms = int(milliseconds)

    @classmethod
    def from_sec(cls, seconds: float) -> "Duration":
        return cls(round(seconds * 1000.0))

    def to_sec(self) -> float:
        return self._ms / 1000.0

    def to_msec(self) -> int:
        return self._ms

    def __eq__(self, other) -> bool:
        return isinstance(other, Duration) and other._ms == self._ms

    def __hash__(self) -> int:
        return hash(self._ms)

    def __repr__(self) -> str:
        return f"Duration({self._ms})"


# libfranka.Errors' flags, in its order
ERROR_FLAGS = (
    "cartesian_motion_generator_acceleration_discontinuity", "cartesian_motion_generator_elbow_limit_violation",
    "cartesian_motion_generator_elbow_sign_inconsistent", "cartesian_motion_generator_joint_acceleration_discontinuity",
    "cartesian_motion_generator_joint_position_limits_violation", "cartesian_motion_generator_joint_velocity_discontinuity",
    "cartesian_motion_generator_joint_velocity_limits_violation", "cartesian_motion_generator_start_elbow_invalid",
    "cartesian_motion_generator_velocity_discontinuity", "cartesian_motion_generator_velocity_limits_violation",
    "cartesian_position_limits_violation", "cartesian_position_motion_generator_invalid_frame",
    "cartesian_position_motion_generator_start_pose_invalid", "cartesian_reflex",
    "cartesian_velocity_profile_safety_violation", "cartesian_velocity_violation", "communication_constraints_violation",
    "controller_torque_discontinuity", "force_control_safety_violation",
    "force_controller_desired_force_tolerance_violation", "instability_detected",
    "joint_motion_generator_acceleration_discontinuity", "joint_motion_generator_position_limits_violation",
    "joint_motion_generator_velocity_discontinuity", "joint_motion_generator_velocity_limits_violation",
    "joint_move_in_wrong_direction", "joint_p2p_insufficient_torque_for_planning", "joint_position_limits_violation",
    "joint_position_motion_generator_start_pose_invalid", "joint_reflex", "joint_velocity_violation",
    "max_goal_pose_deviation_violation", "max_path_pose_deviation_violation", "power_limit_violation",
    "self_collision_avoidance_violation", "start_elbow_sign_inconsistent", "tau_j_range_violation",
)


class Errors:
    """libfranka.Errors: one read-only bool per flag, truthy when any is set, str "[a, b]". The sim may
    fault for a reason libfranka has no flag for (an exception in its loop): such names show in str and
    `names` but set no flag."""

    def __init__(self, names=()):
        object.__setattr__(self, "names", tuple(str(n) for n in names))

    def __getattr__(self, name: str) -> bool:
        if name in ERROR_FLAGS:
            return name in self.names
        raise AttributeError(name)

    def __setattr__(self, name, value):
        raise AttributeError(f"property of 'Errors' object has no setter: {name}")

    def __bool__(self) -> bool:
        return bool(self.names)

    def __eq__(self, other) -> bool:
        return isinstance(other, Errors) and other.names == self.names

    def __hash__(self) -> int:
        return hash(self.names)

    def __str__(self) -> str:
        return "[" + ", ".join(self.names) + "]"

    __repr__ = __str__


def error_list(errors: Any) -> list[str]:
    """A robot state's current errors as names: our Errors, or libfranka's (its str names the set flags)."""
    if isinstance(errors, Errors):
        return list(errors.names)
    if isinstance(errors, (list, tuple)):
        return [str(e) for e in errors]
    if not bool(errors):
        return []
    return [e.strip() for e in str(errors).strip("[]").split(",") if e.strip()]


def robot_mode(mode: Any) -> RobotMode:
    """Our RobotMode from libfranka's (or ours, or a name such as "kMove"); an unknown one is kOther."""
    name = str(getattr(mode, "name", mode)).split(".")[-1]
    return RobotMode.__members__.get(name, RobotMode.kOther)


@dataclass
class RobotState:
    """libfranka.RobotState, the fields the twin knows, with libfranka's types."""
    q: list[float]
    dq: list[float]
    tau_J: list[float]
    O_T_EE: list[float]                     # column-major 4x4, as libfranka
    time: Duration
    robot_mode: RobotMode = RobotMode.kIdle
    current_errors: Errors = field(default_factory=Errors)
    F_T_EE: list[float] = field(default_factory=lambda: F_T_EE.ravel(order="F").tolist())

    @classmethod
    def make(cls, q, dq, tau_J, O_T_EE, time_s: float, mode: RobotMode, errors) -> "RobotState":
        """From arrays and seconds (what the sim and the shared state hold)."""
        return cls([float(x) for x in q], [float(x) for x in dq], [float(x) for x in tau_J],
                   [float(x) for x in np.asarray(O_T_EE).reshape(-1)], Duration.from_sec(time_s), mode, Errors(errors))


@dataclass
class GripperState:
    """libfranka.GripperState."""
    width: float
    max_width: float
    is_grasped: bool
    temperature: int
    time: Duration


def check_vec(x, n: int, name: str) -> np.ndarray:
    """`x` as n finite floats (a copy: the control loop must not see later edits), or ValueError."""
    a = np.array(x, dtype=float).reshape(-1)
    if a.shape != (n,):
        raise ValueError(f"{name} must have {n} elements, got shape {np.shape(x)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf: {a}")
    return a
