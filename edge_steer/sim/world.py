"""The MuJoCo world: model + data and the few queries the controllers, camera and tasks need.

Not thread-safe by itself: `SimPanda` owns the lock that serialises the control thread, the camera
and task queries.
"""

from __future__ import annotations

import threading

import mujoco
import numpy as np

from edge_steer.franka.arm import Q_START
from edge_steer.sim.scene import SceneSpec, build_mjcf


class World:
    def __init__(self, spec: SceneSpec):
        self.spec = spec
        self.model = mujoco.MjModel.from_xml_string(build_mjcf(spec))
        self.data = mujoco.MjData(self.model)
        self.lock = threading.RLock()
        m = self.model
        self._jnt = [mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, f"joint{i}") for i in range(1, 8)]
        self.qadr = np.array([m.jnt_qposadr[j] for j in self._jnt])
        self.vadr = np.array([m.jnt_dofadr[j] for j in self._jnt])
        fj = [mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, f"finger_{s}") for s in ("left", "right")]
        self.f_qadr = np.array([m.jnt_qposadr[j] for j in fj])
        self.f_vadr = np.array([m.jnt_dofadr[j] for j in fj])
        self.tcp_site = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SITE, "tcp")
        self.obj_body = [mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, f"obj{i}") for i in range(len(spec.objects))]
        self._finger_geoms = {mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, f"finger_{s}_pad") for s in ("left", "right")}
        self._jacp = np.zeros((3, m.nv))
        self._jacr = np.zeros((3, m.nv))
        self._mass = np.zeros((m.nv, m.nv))
        self.reset()

    def reset(self, q: np.ndarray = Q_START, finger: float = 0.04) -> None:
        mujoco.mj_resetData(self.model, self.data)
        self.data.qpos[self.qadr] = q
        self.data.qpos[self.f_qadr] = finger
        mujoco.mj_forward(self.model, self.data)

    # --- robot state -------------------------------------------------------------------------
    @property
    def time(self) -> float:
        return float(self.data.time)

    @property
    def q(self) -> np.ndarray:
        return self.data.qpos[self.qadr].copy()

    @property
    def dq(self) -> np.ndarray:
        return self.data.qvel[self.vadr].copy()

    @property
    def gripper_width(self) -> float:
        return float(self.data.qpos[self.f_qadr].sum())

    def tcp_pose(self) -> tuple[np.ndarray, np.ndarray]:
        return self.data.site_xpos[self.tcp_site].copy(), self.data.site_xmat[self.tcp_site].reshape(3, 3).copy()

    def tcp_jacobian(self) -> np.ndarray:
        """6x7 geometric Jacobian of the TCP (linear; angular) in the base frame."""
        mujoco.mj_jacSite(self.model, self.data, self._jacp, self._jacr, self.tcp_site)
        return np.vstack([self._jacp[:, self.vadr], self._jacr[:, self.vadr]])

    def arm_mass_matrix(self) -> np.ndarray:
        mujoco.mj_fullM(self.model, self._mass, self.data.qM)
        return self._mass[np.ix_(self.vadr, self.vadr)]

    def arm_bias(self) -> np.ndarray:
        """Gravity + Coriolis torques: the real Panda compensates these inside its controller."""
        return self.data.qfrc_bias[self.vadr].copy()

    def arm_torque(self) -> np.ndarray:
        return self.data.actuator_force[:7].copy()

    def step(self, tau: np.ndarray, finger_force: np.ndarray) -> None:
        self.data.ctrl[:7] = tau
        self.data.ctrl[7:9] = finger_force
        mujoco.mj_step(self.model, self.data)

    # --- objects -------------------------------------------------------------------------------
    def object_pos(self, i: int) -> np.ndarray:
        return self.data.xpos[self.obj_body[i]].copy()

    def object_mat(self, i: int) -> np.ndarray:
        return self.data.xmat[self.obj_body[i]].reshape(3, 3).copy()

    def object_speed(self, i: int) -> float:
        return float(np.linalg.norm(self.data.cvel[self.obj_body[i]][3:]))

    def fingers_touch(self, i: int) -> bool:
        """True if a finger pad is in contact with object i (i.e. it is held or pushed)."""
        body = self.obj_body[i]
        for c in self.data.contact[: self.data.ncon]:
            g1, g2 = c.geom1, c.geom2
            b1, b2 = self.model.geom_bodyid[g1], self.model.geom_bodyid[g2]
            if (g1 in self._finger_geoms and b2 == body) or (g2 in self._finger_geoms and b1 == body):
                return True
        return False
