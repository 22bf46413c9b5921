"""One episode of a task in the sim: observations in, actions out. The action and state it speaks are
the policy's contract with the robot (edge_steer/contract.py, with why deltas are taken from the
commanded target rather than the measured pose).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_steer.contract import ACTION_NAMES, advance_target, tcp_state
from edge_steer.geometry import mat_to_quat, orientation_error, rotvec_to_mat
from edge_steer.sim.camera import SceneRenderer
from edge_steer.sim.panda import CartesianImpedance, SimGripper, SimPanda
from edge_steer.franka.arm import Q_START
from edge_steer.sim.tasks import SceneInstance, Task
from edge_steer.sim.world import World

CAMERAS = ("front", "wrist")


@dataclass(frozen=True)
class EnvConfig:
    image_size: int = 96           # the reference VLA's input resolution
    fps: int = 10                  # control (policy) rate
    max_steps: int = 150
    realtime: bool = False
    start_noise: float = 0.05      # rad of joint noise around the start pose
    grasp_force: float = 40.0      # N
    impedance: tuple[float, float] = (1000.0, 50.0)  # translational N/m, rotational Nm/rad


def observation_keys() -> tuple[str, ...]:
    return tuple(f"observation.images.{c}" for c in CAMERAS) + ("observation.state", "observation.joints")


class SimEnv:
    def __init__(self, task: Task, seed: int, config: EnvConfig = EnvConfig()):
        self.task, self.seed, self.config = task, seed, config
        rng = np.random.default_rng(seed)
        self.scene: SceneInstance = task.sample_scene(rng, config.image_size)
        self.world = World(self.scene.spec)
        q0 = Q_START + rng.uniform(-config.start_noise, config.start_noise, 7)
        self.world.reset(q0)
        self.panda = SimPanda(self.world, realtime=config.realtime)
        self.gripper = SimGripper(self.panda)
        kt, kr = config.impedance
        self.controller = CartesianImpedance(np.diag([kt] * 3 + [kr] * 3), nullspace_stiffness=2.0)
        self.panda.start_controller(self.controller)
        pose = self.panda.get_pose()
        self._target_p, self._target_r = pose[:3, 3], pose[:3, :3]
        self._q_null = q0
        self._grip_closed = False
        self._renderer: SceneRenderer | None = None  # made on first observe(): GL is per thread
        self.steps = 0

    def observe(self) -> dict[str, np.ndarray]:
        if self._renderer is None:
            self._renderer = SceneRenderer(self.world, self.config.image_size, self.config.image_size)
        obs = {f"observation.images.{c}": self._renderer.rgb(c) for c in CAMERAS}
        with self.world.lock:
            pos, rot = self.world.tcp_pose()
            obs["observation.state"] = tcp_state(pos, rot, self.world.gripper_width)
            obs["observation.joints"] = self.world.q.astype(np.float32)
        return obs

    def step(self, action: np.ndarray) -> None:
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (7,):
            raise ValueError(f"action must have 7 elements {ACTION_NAMES}, got shape {np.shape(action)}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"action contains NaN/inf: {a}")
        p1, r1 = advance_target(self._target_p, self._target_r, a, self.panda.get_position())
        close = bool(a[6] >= 0.5)
        if close != self._grip_closed:
            if close:
                self.gripper.grasp_async(0.04, 0.1, self.config.grasp_force, epsilon_inner=0.04, epsilon_outer=0.04)
            else:
                self.gripper.move_async(0.08, 0.1)
            self._grip_closed = close
        self._move_target(p1, r1, 1.0 / self.config.fps)
        self.steps += 1

    def _move_target(self, p1: np.ndarray, r1: np.ndarray, duration: float) -> None:
        p0, r0 = self._target_p, self._target_r
        rv = orientation_error(r1, r0)
        n = max(1, int(round(duration * 1000)))
        ctx = self.panda.create_context(frequency=1000)
        k = 0
        while ctx.ok() and k < n:
            k += 1
            s = k / n
            self.controller.set_control(p0 + s * (p1 - p0), mat_to_quat(rotvec_to_mat(s * rv) @ r0), self._q_null)
        self._target_p, self._target_r = p1, r1

    @property
    def gripper_closed(self) -> bool:
        """Whether the last action commanded the gripper closed."""
        return self._grip_closed

    @property
    def target(self) -> tuple[np.ndarray, np.ndarray]:
        """The commanded TCP target (position, rotation) that the next action is relative to."""
        return self._target_p.copy(), self._target_r.copy()

    def success(self) -> bool:
        with self.world.lock:
            return self.task.success(self.world)

    def close(self) -> None:
        self.panda.close()
        if self._renderer is not None:
            self._renderer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
