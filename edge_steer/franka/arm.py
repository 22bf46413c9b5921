"""The Franka Emika Panda from its published parameters: kinematics (Franka's modified Denavit-Hartenberg
table, Craig's convention), joint limits, the Franka Hand's end-effector frame, and panda-py's controller
defaults. The simulator builds its MJCF arm from the same table (sim/panda_model.py), so the simulated
kinematics and `fk()` cannot drift apart.
"""

from __future__ import annotations

import numpy as np

from edge_steer.geometry import rot_x, rot_z

# (a_{i-1}, d_i, alpha_{i-1}) for joints 1..7, then the flange (theta = 0).
DH = np.array([
    [0.0, 0.333, 0.0],
    [0.0, 0.0, -np.pi / 2],
    [0.0, 0.316, np.pi / 2],
    [0.0825, 0.0, np.pi / 2],
    [-0.0825, 0.384, -np.pi / 2],
    [0.0, 0.0, np.pi / 2],
    [0.088, 0.0, np.pi / 2],
])
FLANGE_D = 0.107
# Franka Hand: the end-effector frame sits 0.1034 m past the flange, turned -45 deg about z. This is
# libfranka's F_T_EE for the hand as Desk sets it by default, so the robot's own O_T_EE (get_state,
# get_pose) uses it. panda_py.fk/ik are closed forms with the hand at 0.103 m: on the real arm too they
# differ from get_pose() by 0.4 mm along the tool axis (docs/sim.md).
HAND_TCP_D = 0.1034
HAND_YAW = -np.pi / 4
PANDA_PY_FK_TCP_D = 0.103     # what panda_py.fk puts past the flange (its closed form's 0.21 = 0.107 + 0.103)

Q_MIN = np.array([-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973])
Q_MAX = np.array([2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973])
DQ_MAX = np.array([2.1750, 2.1750, 2.1750, 2.1750, 2.6100, 2.6100, 2.6100])
TAU_MAX = np.array([87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0])
GRIPPER_MAX_WIDTH = 0.08
# panda-py's move_to_start pose, and its default nullspace target
Q_START = np.array([0.0, -np.pi / 4, 0.0, -3 * np.pi / 4, 0.0, np.pi / 2, np.pi / 4])

# panda-py's controller defaults (panda_py.controllers, Panda.move_to_*)
DEFAULT_IMPEDANCE = np.diag([600.0, 600.0, 600.0, 30.0, 30.0, 30.0])
DEFAULT_STIFFNESS = np.array([600.0, 600.0, 600.0, 600.0, 250.0, 150.0, 50.0])
DEFAULT_DAMPING = np.array([50.0, 50.0, 50.0, 20.0, 20.0, 20.0, 10.0])
MOVE_TO_POSE_IMPEDANCE = np.diag([800.0, 800.0, 800.0, 40.0, 40.0, 40.0])


def dh_transform(a: float, d: float, alpha: float, theta: float) -> np.ndarray:
    t = np.eye(4)
    t[:3, :3] = rot_x(alpha) @ rot_z(theta)
    t[:3, 3] = [a, -np.sin(alpha) * d, np.cos(alpha) * d]
    return t


def hand_transform(d: float = HAND_TCP_D) -> np.ndarray:
    """F_T_EE: the end-effector frame in the flange frame (`d` m down the flange's z, turned HAND_YAW)."""
    return dh_transform(0.0, d, 0.0, HAND_YAW)


F_T_EE = hand_transform()


def frames(q: np.ndarray) -> list[np.ndarray]:
    """Base-frame poses (4x4) of libfranka's frames at `q`: joints 1-7, the flange, the end effector
    (libfranka.Frame kJoint1..kEndEffector, in that order)."""
    q = np.asarray(q, dtype=float)
    if q.shape != (7,):
        raise ValueError(f"fk expects 7 joint angles, got shape {q.shape}")
    out, t = [], np.eye(4)
    for (a, d, alpha), th in zip(DH, q):
        t = t @ dh_transform(a, d, alpha, th)
        out.append(t)
    t = t @ dh_transform(0.0, FLANGE_D, 0.0, 0.0)
    return out + [t, t @ F_T_EE]


def fk(q: np.ndarray, tcp: bool = True) -> np.ndarray:
    """Base-frame pose (4x4) of the end effector (O_T_EE) or, with tcp=False, of the flange."""
    return frames(q)[8 if tcp else 7]
