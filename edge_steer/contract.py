"""The policy's contract with the robot, defined once: action and state layout, how an action moves the
commanded TCP target, the TCP state a policy sees, and how overlapping action chunks are ensembled.

`[dx, dy, dz, drx, dry, drz, gripper]` is the end-effector (TCP) target for the next control step, as a
translation (m) and a rotation vector (rad, base frame, left-multiplied) relative to the current
*commanded* TCP target, and a gripper command (>= 0.5 close/grasp, < 0.5 open). Deltas are taken from the
target rather than the measured pose because an impedance controller lags its target: from the measured
pose, the same action would move the arm by an amount that depends on its speed. The target is kept
within MAX_TARGET_LEAD of the measured TCP, so a blocked arm cannot wind up the impedance spring.

The state is `[x, y, z, qx, qy, qz, qw, gripper_width]`. The quaternion's sign is fixed by `qx >= 0`,
which keeps it continuous around the gripper-down orientation the tasks use.

numpy only: the simulator (sim/env.py), the models and the robot's 1 kHz process all import it.
"""

from __future__ import annotations

import numpy as np

from edge_steer.geometry import mat_to_quat, rotvec_to_mat

ACTION_NAMES = ("dx", "dy", "dz", "drx", "dry", "drz", "gripper")
STATE_NAMES = ("x", "y", "z", "qx", "qy", "qz", "qw", "gripper_width")
ACTION_DIM = len(ACTION_NAMES)
STATE_DIM = len(STATE_NAMES)
GRIPPER_CLOSE = 0.5           # action[6] at or above it closes the gripper
MAX_STEP_TRANSLATION = 0.05   # m per control step (0.5 m/s at 10 Hz)
MAX_STEP_ROTATION = 0.3       # rad per control step
MAX_TARGET_LEAD = 0.04        # m the commanded target may lead the measured TCP


def tcp_state(pos: np.ndarray, rot: np.ndarray, width: float) -> np.ndarray:
    """The policy's state vector from a TCP pose (position, 3x3 rotation) and the finger width."""
    quat = mat_to_quat(rot)
    if quat[0] < 0:
        quat = -quat
    return np.concatenate([pos, quat, [width]]).astype(np.float32)


def advance_target(target_p: np.ndarray, target_r: np.ndarray, action: np.ndarray,
                   measured_p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The next commanded TCP target (position, rotation) from the current one and a finite 7-D action."""
    dp = action[:3]
    n = np.linalg.norm(dp)
    if n > MAX_STEP_TRANSLATION:
        dp = dp * (MAX_STEP_TRANSLATION / n)
    dr = action[3:6]
    n = np.linalg.norm(dr)
    if n > MAX_STEP_ROTATION:
        dr = dr * (MAX_STEP_ROTATION / n)
    p1 = target_p + dp
    lead = p1 - measured_p
    if np.linalg.norm(lead) > MAX_TARGET_LEAD:
        p1 = measured_p + lead * (MAX_TARGET_LEAD / np.linalg.norm(lead))
    return p1, rotvec_to_mat(dr) @ target_r


def ensemble_actions(actions: list[np.ndarray], decay: float) -> np.ndarray:
    """ACT's temporal ensemble: the actions that overlapping chunks predicted for one time step, oldest
    chunk first, averaged with weights exp(-decay * i) (i = 0 the oldest), so the plan changes gradually
    instead of jumping at each new chunk."""
    w = np.exp(-decay * np.arange(len(actions)))
    return (w[:, None] * np.stack(actions)).sum(0) / w.sum()
