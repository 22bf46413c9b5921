"""The simulated Franka Emika Panda's body, built from its published parameters (edge_steer/franka/arm.py).

The MJCF arm is generated from Franka's modified Denavit-Hartenberg table, the same one `fk()` uses,
so the simulated kinematics and `fk()` cannot drift apart. Link shapes are capsules along the DH
offsets (no meshes), masses are the published per-link values, inertias are approximations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# the arm's parameters live in the Franka room (numpy only: the robot's process imports them too)
from edge_steer.franka.arm import DH, FLANGE_D, HAND_TCP_D, HAND_YAW, Q_MAX, Q_MIN

LINK_MASS = np.array([4.970684, 0.646926, 3.228604, 3.587895, 1.225946, 1.666555, 7.35522e-01])
HAND_MASS = 0.73


@dataclass(frozen=True)
class ArmLook:
    """Colours of the arm geoms (rgba strings)."""

    link: str = "0.92 0.92 0.92 1"
    joint: str = "0.25 0.25 0.27 1"
    hand: str = "0.85 0.85 0.85 1"
    finger: str = "0.2 0.2 0.22 1"


def _vec(v) -> str:
    return " ".join(f"{x:.12g}" for x in v)  # quaternions need the digits: 6 gave 1e-6 rad errors


def arm_mjcf(look: ArmLook = ArmLook(), wrist_camera_fovy: float = 80.0) -> str:
    """MJCF body tree of the arm + hand, to be placed inside <worldbody>.

    Body i's frame is the DH frame of joint i (joint axis = local z). Arm geoms use contype 2 /
    conaffinity 0: they touch the world (objects, table) but not each other.
    """
    radius = [0.06, 0.06, 0.06, 0.055, 0.055, 0.05, 0.045]
    lines = ['<geom name="link0" type="capsule" fromto="0 0 0.03 0 0 0.2" size="0.065" '
             f'rgba="{look.link}" contype="2" conaffinity="0" mass="2.8"/>']
    depth = 0
    for i, ((a, d, alpha), r) in enumerate(zip(DH, radius), start=1):
        pos = [a, -np.sin(alpha) * d, np.cos(alpha) * d]
        quat = [np.cos(alpha / 2), np.sin(alpha / 2), 0.0, 0.0]
        lines.append(f'<body name="link{i}" pos="{_vec(pos)}" quat="{_vec(quat)}">')
        lines.append(f'<inertial pos="0 0 0" mass="{LINK_MASS[i - 1]:.6g}" diaginertia="0.02 0.02 0.01"/>')
        lines.append(f'<joint name="joint{i}" type="hinge" axis="0 0 1" range="{Q_MIN[i - 1]} {Q_MAX[i - 1]}" '
                     f'limited="true" damping="0.5" armature="0.1" frictionloss="0.05"/>')
        lines.append(f'<geom type="cylinder" fromto="0 0 -0.06 0 0 0.06" size="{r}" rgba="{look.joint}" '
                     'contype="2" conaffinity="0" mass="0"/>')
        # Capsule along the offset to the next frame (expressed in this frame).
        if i < 7:
            na, nd, nalpha = DH[i]
            nxt = np.array([na, -np.sin(nalpha) * nd, np.cos(nalpha) * nd])
        else:
            nxt = np.array([0.0, 0.0, FLANGE_D])
        if i == 1:  # link 1 hangs down to the base
            lines.append(f'<geom type="capsule" fromto="0 0 -0.2 0 0 0" size="{r}" rgba="{look.link}" '
                         'contype="2" conaffinity="0" mass="0"/>')
        if np.linalg.norm(nxt) > 1e-6:
            lines.append(f'<geom type="capsule" fromto="0 0 0 {_vec(nxt)}" size="{r * 0.9:.4g}" '
                         f'rgba="{look.link}" contype="2" conaffinity="0" mass="0"/>')
        depth += 1
    # Flange + hand: hand frame = flange frame rotated by HAND_YAW; TCP 0.1034 m down its z axis.
    hq = [np.cos(HAND_YAW / 2), 0.0, 0.0, np.sin(HAND_YAW / 2)]
    lines.append(f'<body name="hand" pos="0 0 {FLANGE_D}" quat="{_vec(hq)}">')
    lines.append(f'<inertial pos="0 0 0.04" mass="{HAND_MASS}" diaginertia="0.003 0.0025 0.0017"/>')
    lines.append(f'<geom name="hand_body" type="box" pos="0 0 0.035" size="0.025 0.1 0.022" rgba="{look.hand}" '
                 'contype="2" conaffinity="0" mass="0"/>')
    lines.append(f'<site name="tcp" pos="0 0 {HAND_TCP_D}" size="0.005" rgba="1 0 0 0"/>')
    # Wrist camera: on the hand, tilted 24 deg toward the fingers so that the fingertips and the object
    # between them stay in view down to the grasp, as on a real wrist mount (cameras look along -z).
    # Looking straight down past the fingers, it lost the object in the last 5 cm of every descent.
    lines.append(f'<camera name="wrist" pos="0.075 0 0.02" xyaxes="0 -1 0 -0.915 0 -0.403" fovy="{wrist_camera_fovy}"/>')
    for side, sign in (("left", 1), ("right", -1)):
        lines.append(f'<body name="finger_{side}" pos="0 0 0.0584">')
        lines.append('<inertial pos="0 0 0.03" mass="0.015" diaginertia="2e-5 2e-5 1e-5"/>')
        lines.append(f'<joint name="finger_{side}" type="slide" axis="0 {sign} 0" range="0 0.04" limited="true" '
                     'damping="2" armature="0.01"/>')
        lines.append(f'<geom name="finger_{side}_pad" type="box" pos="0 {sign * 0.008} 0.033" size="0.011 0.008 0.019" '
                     f'rgba="{look.finger}" contype="2" conaffinity="0" friction="1.5 0.02 0.001" '
                     'condim="4" solref="0.004 1" mass="0"/>')
        lines.append('</body>')
    lines.append("</body>")
    lines.extend(["</body>"] * depth)
    return "\n".join(lines)
