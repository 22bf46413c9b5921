"""Tabletop scene description -> MJCF.

A `SceneSpec` is everything that varies between episodes: which entities stand where, and the
environment (lighting, table, distractors, camera pose). `build_mjcf` turns it into one MJCF string;
the arm itself comes from `panda_model.arm_mjcf` so the kinematics have a single source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_steer.geometry import look_at_xyaxes
from edge_steer.sim.panda_model import arm_mjcf

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10), "green": (0.15, 0.65, 0.20), "blue": (0.12, 0.30, 0.85),
    "yellow": (0.92, 0.80, 0.10), "white": (0.92, 0.92, 0.90), "black": (0.08, 0.08, 0.08),
    "purple": (0.55, 0.20, 0.70), "orange": (0.98, 0.50, 0.05), "pink": (0.95, 0.45, 0.65),
    "cyan": (0.10, 0.75, 0.80), "brown": (0.45, 0.28, 0.12),
}
GRASPABLE = ("cube", "cylinder", "sphere")
RECEPTACLES = ("bowl", "plate")
SHAPES = GRASPABLE + RECEPTACLES
LIGHTING = {  # name -> (directional diffuse rgb, ambient rgb)
    "default": ((0.75, 0.75, 0.75), (0.30, 0.30, 0.30)),
    "bright": ((0.95, 0.95, 0.95), (0.40, 0.40, 0.40)),
    "dim": ((0.35, 0.33, 0.30), (0.12, 0.12, 0.12)),
    "warm": ((0.85, 0.62, 0.38), (0.25, 0.18, 0.10)),
    "cool": ((0.55, 0.65, 0.90), (0.18, 0.22, 0.30)),
}
TABLES = {  # name -> (rgb1, rgb2, builtin texture or None)
    "grey": ((0.55, 0.55, 0.53), None, None),
    "white": ((0.85, 0.85, 0.83), None, None),
    "wood": ((0.55, 0.38, 0.22), (0.45, 0.30, 0.16), "gradient"),
    "dark": ((0.18, 0.16, 0.15), None, None),
    "checker": ((0.60, 0.60, 0.58), (0.35, 0.35, 0.34), "checker"),
}
TABLE_TOP_Z = 0.0
TABLE_CENTER = (0.5, 0.0)
TABLE_HALF = (0.42, 0.55)
FRONT_CAMERA_EYE = np.array([0.95, 0.0, 0.85])
FRONT_CAMERA_TARGET = np.array([0.5, 0.0, 0.0])


@dataclass(frozen=True)
class Entity:
    """An object kind: shape, colour and size scale (1.0 = nominal)."""

    shape: str
    color: str
    size: float = 1.0

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose from {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; choose from {sorted(COLORS)}")
        if not 0.7 <= self.size <= 1.3:
            raise ValueError(f"entity size scale {self.size} outside [0.7, 1.3] (grasp width limits)")

    @property
    def name(self) -> str:
        size = "" if self.size == 1.0 else ("small " if self.size < 1.0 else "large ")
        return f"{size}{self.color} {self.shape}"

    @property
    def half_height(self) -> float:
        return {"cube": 0.022, "cylinder": 0.03, "sphere": 0.022, "bowl": 0.024, "plate": 0.006}[self.shape] * self.size

    @property
    def radius(self) -> float:
        """Footprint radius (for placement spacing and on/in predicates)."""
        return {"cube": 0.031, "cylinder": 0.02, "sphere": 0.022, "bowl": 0.075, "plate": 0.075}[self.shape] * self.size

    @property
    def inner_radius(self) -> float:
        """Usable radius for 'on'/'in' (a bowl's floor, a plate's top)."""
        return {"bowl": 0.062, "plate": 0.07}.get(self.shape, self.radius) * self.size

    def mjcf_geoms(self, rgba: str) -> str:
        s = self.size
        common = f'rgba="{rgba}" contype="1" conaffinity="3"'
        if self.shape == "cube":
            h = 0.022 * s
            return f'<geom type="box" size="{h} {h} {h}" mass="0.08" friction="1.0 0.01 0.001" condim="4" {common}/>'
        if self.shape == "cylinder":
            return (f'<geom type="cylinder" size="{0.02 * s} {0.03 * s}" mass="0.08" friction="1.0 0.01 0.001" '
                    f'condim="4" {common}/>')
        if self.shape == "sphere":
            # rolling friction keeps a placed sphere where it was put
            return (f'<geom type="sphere" size="{0.022 * s}" mass="0.06" friction="1.0 0.02 0.02" condim="6" '
                    f'{common}/>')
        if self.shape == "plate":
            return f'<geom type="cylinder" size="{0.075 * s} 0.006" mass="0.3" friction="0.8 0.01 0.001" {common}/>'
        # bowl: a floor plus a ring of wall segments (one rigid body)
        r_in, wall_h, n = 0.065 * s, 0.024 * s, 16
        out = [f'<geom type="cylinder" pos="0 0 {-wall_h + 0.004}" size="{r_in} 0.004" mass="0.15" {common}/>']
        seg = 2 * np.pi * (r_in + 0.004) / n / 2 * 1.05
        for k in range(n):
            a = 2 * np.pi * k / n
            x, y = (r_in + 0.004) * np.cos(a), (r_in + 0.004) * np.sin(a)
            out.append(f'<geom type="box" pos="{x:.5f} {y:.5f} 0" euler="0 0 {a:.5f}" '
                       f'size="0.004 {seg:.5f} {wall_h:.5f}" mass="0.01" {common}/>')
        return "\n".join(out)


@dataclass(frozen=True)
class EnvSpec:
    """The environment factor: lighting, table look, distractor count, camera pose jitter (metres), and how far
    (metres, each side) the region objects are spawned in is widened beyond the one demos are recorded in."""

    lighting: str = "default"
    table: str = "grey"
    distractors: int = 1
    camera_jitter: float = 0.0
    spawn_margin: float = 0.0

    def __post_init__(self):
        if self.lighting not in LIGHTING:
            raise ValueError(f"unknown lighting {self.lighting!r}; choose from {sorted(LIGHTING)}")
        if self.table not in TABLES:
            raise ValueError(f"unknown table {self.table!r}; choose from {sorted(TABLES)}")
        if not 0 <= self.distractors <= 5:
            raise ValueError(f"distractors must be in [0, 5], got {self.distractors}")
        if not 0.0 <= self.camera_jitter <= 0.1:
            raise ValueError(f"camera_jitter must be in [0, 0.1] m, got {self.camera_jitter}")
        if not 0.0 <= self.spawn_margin <= 0.05:   # wider leaves the arm's comfortable reach and the camera's frame
            raise ValueError(f"spawn_margin must be in [0, 0.05] m, got {self.spawn_margin}")


@dataclass(frozen=True)
class Placement:
    entity: Entity
    xy: tuple[float, float]
    yaw: float = 0.0


@dataclass(frozen=True)
class SceneSpec:
    objects: tuple[Placement, ...]
    env: EnvSpec = field(default_factory=EnvSpec)
    light_scale: float = 1.0              # per-episode brightness jitter
    camera_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    image_size: int = 128


def front_camera_xml(offset=(0.0, 0.0, 0.0), fovy: float = 42.0) -> str:
    eye = FRONT_CAMERA_EYE + np.asarray(offset)
    ax = look_at_xyaxes(eye, FRONT_CAMERA_TARGET)
    return (f'<camera name="front" pos="{eye[0]:.5f} {eye[1]:.5f} {eye[2]:.5f}" '
            f'xyaxes="{" ".join(f"{v:.5f}" for v in ax)}" fovy="{fovy}"/>')


def build_mjcf(spec: SceneSpec) -> str:
    diffuse, ambient = LIGHTING[spec.env.lighting]
    diffuse = tuple(min(1.0, c * spec.light_scale) for c in diffuse)
    rgb1, rgb2, builtin = TABLES[spec.env.table]
    if builtin:
        tex = (f'<texture name="table_tex" type="2d" builtin="{builtin}" rgb1="{" ".join(map(str, rgb1))}" '
               f'rgb2="{" ".join(map(str, rgb2))}" width="128" height="128"/>'
               '<material name="table_mat" texture="table_tex" texrepeat="4 4" reflectance="0"/>')
    else:
        tex = f'<material name="table_mat" rgba="{" ".join(map(str, rgb1))} 1" reflectance="0"/>'
    bodies = []
    for i, p in enumerate(spec.objects):
        z = TABLE_TOP_Z + p.entity.half_height + 0.001
        rgba = " ".join(f"{c:.3f}" for c in COLORS[p.entity.color]) + " 1"
        bodies.append(
            f'<body name="obj{i}" pos="{p.xy[0]:.5f} {p.xy[1]:.5f} {z:.5f}" euler="0 0 {p.yaw:.5f}">'
            f'<freejoint name="obj{i}_free"/>{p.entity.mjcf_geoms(rgba)}</body>')
    tx, ty = TABLE_CENTER
    hx, hy = TABLE_HALF
    return f"""
<mujoco model="edge_steer_tabletop">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="0.001" integrator="implicitfast" cone="elliptic" impratio="10"/>
  <visual>
    <headlight ambient="{" ".join(f"{c:.3f}" for c in ambient)}" diffuse="0.15 0.15 0.15" specular="0 0 0"/>
    <global offwidth="{max(640, spec.image_size)}" offheight="{max(480, spec.image_size)}"/>
    <quality shadowsize="1024"/>
  </visual>
  <asset>
    {tex}
    <texture name="floor_tex" type="2d" builtin="flat" rgb1="0.3 0.32 0.35" width="8" height="8"/>
    <material name="floor_mat" texture="floor_tex"/>
  </asset>
  <worldbody>
    <light name="key" directional="true" pos="0.5 0.3 2.0" dir="-0.2 -0.15 -1" diffuse="{" ".join(f"{c:.3f}" for c in diffuse)}" specular="0.1 0.1 0.1" castshadow="true"/>
    <geom name="floor" type="plane" pos="0 0 -0.75" size="3 3 0.1" material="floor_mat" contype="1" conaffinity="3"/>
    <geom name="table" type="box" pos="{tx} {ty} {TABLE_TOP_Z - 0.025}" size="{hx} {hy} 0.025" material="table_mat" contype="1" conaffinity="3" friction="0.8 0.01 0.001"/>
    <geom name="pedestal" type="box" pos="-0.05 0 -0.375" size="0.12 0.12 0.375" rgba="0.2 0.2 0.22 1" contype="0" conaffinity="0"/>
    {front_camera_xml(spec.camera_offset)}
    {arm_mjcf()}
    {"".join(bodies)}
  </worldbody>
  <actuator>
    {"".join(f'<motor name="m{i}" joint="joint{i}" ctrllimited="false"/>' for i in range(1, 8))}
    <motor name="f_left" joint="finger_left" ctrllimited="false"/>
    <motor name="f_right" joint="finger_right" ctrllimited="false"/>
  </actuator>
</mujoco>
"""
