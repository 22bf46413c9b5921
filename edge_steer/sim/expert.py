"""Scripted expert: a top-down pick-and-place through Cartesian waypoints.

It reads the privileged sim state once (object poses, goal), plans min-jerk segments between
waypoints, and at each control step emits the action that moves the commanded TCP target to where
the plan is one step later (see `env.py` for the action's meaning).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_steer.geometry import mat_to_rotvec, orientation_error, rot_z, rotvec_to_mat
from edge_steer.sim.env import SimEnv

R_DOWN = np.diag([1.0, -1.0, -1.0])  # gripper pointing down, fingers opening along base y
SPEED = 0.3        # m/s cruise for transfer segments
APPROACH = 0.12    # m above grasp / place height


@dataclass(frozen=True)
class Waypoint:
    pos: np.ndarray
    yaw: float
    grip: float      # 1 = closed
    duration: float  # seconds to reach this waypoint from the previous one


def _min_jerk(s: float) -> float:
    s = min(max(s, 0.0), 1.0)
    return 10 * s**3 - 15 * s**4 + 6 * s**5


def _grasp_yaw(env: SimEnv) -> float:
    if env.task.obj.shape != "cube":
        return 0.0
    m = env.world.object_mat(0)
    yaw = np.arctan2(m[1, 0], m[0, 0])
    return float((yaw + np.pi / 4) % (np.pi / 2) - np.pi / 4)  # the cube face closest to neutral


def plan(env: SimEnv) -> list[Waypoint]:
    task, w = env.task, env.world
    obj = w.object_pos(0)
    tgt = w.object_pos(1)
    gx, gy = env.scene.goal_xy
    if task.relation in ("on", "in"):
        gx, gy = tgt[0] + (gx - w.spec.objects[1].xy[0]), tgt[1] + (gy - w.spec.objects[1].xy[1])
        surface = tgt[2] + (task.target.half_height if task.target.shape == "plate" else -task.target.half_height + 0.008)
    else:
        surface = 0.0
    z_grasp = max(obj[2], 0.016)
    z_place = surface + task.obj.half_height + 0.012
    yaw = _grasp_yaw(env)
    start = w.tcp_pose()[0]
    pre_grasp = np.array([obj[0], obj[1], z_grasp + APPROACH])
    pre_place = np.array([gx, gy, z_place + APPROACH])

    def travel(a, b, lo=0.6):
        return max(lo, 1.875 * float(np.linalg.norm(b - a)) / SPEED)

    grasp = np.array([obj[0], obj[1], z_grasp])
    lift = grasp + [0, 0, 0.15]
    place = np.array([gx, gy, z_place])
    return [
        Waypoint(pre_grasp, yaw, 0.0, travel(start, pre_grasp, 1.0)),
        Waypoint(grasp, yaw, 0.0, 0.9),
        Waypoint(grasp, yaw, 1.0, 0.6),          # close and let the grasp settle
        Waypoint(lift, yaw, 1.0, 0.8),
        Waypoint(pre_place, 0.0, 1.0, travel(lift, pre_place)),
        Waypoint(place, 0.0, 1.0, 0.9),
        Waypoint(place, 0.0, 0.0, 0.5),          # release
        Waypoint(place + [0, 0, APPROACH], 0.0, 0.0, 0.7),
    ]


class ScriptedExpert:
    def __init__(self, env: SimEnv, start: tuple[np.ndarray, np.ndarray] | None = None):
        """`start`: the pose the plan begins at (default: the measured TCP pose)."""
        self.env = env
        self.waypoints = plan(env)
        self._start = start if start is not None else env.world.tcp_pose()
        self._t_end = np.cumsum([wp.duration for wp in self.waypoints])
        self.duration = float(self._t_end[-1])

    def pose_at(self, t: float) -> tuple[np.ndarray, np.ndarray, float]:
        """Planned TCP position, rotation and gripper command at time t since the start."""
        prev_p, prev_r = self._start
        t0 = 0.0
        for wp, t1 in zip(self.waypoints, self._t_end):
            r1 = rot_z(wp.yaw) @ R_DOWN
            if t <= t1:
                b = _min_jerk((t - t0) / wp.duration)
                r = rotvec_to_mat(b * orientation_error(r1, prev_r)) @ prev_r
                return prev_p + b * (wp.pos - prev_p), r, wp.grip
            prev_p, prev_r, t0 = wp.pos, r1, t1
        last = self.waypoints[-1]
        return last.pos, rot_z(last.yaw) @ R_DOWN, last.grip

    def act(self, step: int) -> np.ndarray:
        dt = 1.0 / self.env.config.fps
        p_goal, r_goal, grip = self.pose_at((step + 1) * dt)
        p, r = self.env.target
        return np.concatenate([p_goal - p, mat_to_rotvec(r_goal @ r.T), [grip]]).astype(np.float32)

    @property
    def num_steps(self) -> int:
        return int(np.ceil(self.duration * self.env.config.fps)) + 3  # a few steps to settle


PUSH_STEPS = 3


def run_expert_episode(env: SimEnv, record=None, action_noise: float = 0.0,
                       rng: np.random.Generator | None = None, push: float = 0.0) -> bool:
    """Run the expert to the end of its plan; `record(obs, action)` is called at each step.

    With `action_noise` (m, per step) the executed translation is perturbed while the clean expert
    action is recorded (DART-style): because actions are relative to the commanded target, the
    expert's next action corrects the drift, so the demos show recoveries a policy will need.
    `push` (m): once during the reach, the arm is shoved sideways by that much over a few unrecorded
    steps and the expert re-plans from there. Small per-step noise never takes the arm far from the
    planned path, so the path itself keeps telling where the object is and a policy can copy it
    instead of looking (attempt 5's failure); after a shove the path points elsewhere and the recorded
    actions lead to the object."""
    expert = ScriptedExpert(env)
    rng = rng or np.random.default_rng(env.seed)
    reach = int(expert.waypoints[0].duration * env.config.fps)
    push_at = int(rng.integers(2, max(3, reach - PUSH_STEPS))) if push > 0 else -1
    angle = rng.uniform(0.0, 2 * np.pi)
    shove = np.zeros(7, dtype=np.float32)
    shove[:2] = push / PUSH_STEPS * np.array([np.cos(angle), np.sin(angle)])
    k = 0
    while k < expert.num_steps:
        if k == push_at:
            # unrecorded: the expert does not push. Actions are relative to the commanded target, so
            # it would undo a shove in one step; it re-plans from where the shove left the arm instead
            for _ in range(PUSH_STEPS):
                env.step(shove)
            # from the commanded pose: the measured one lags it, and the gap would be one big label
            expert, k, push_at = ScriptedExpert(env, start=env.target), 0, -1
            continue
        obs = env.observe() if record is not None else None
        with env.world.lock:
            action = expert.act(k)
        if record is not None:
            record(obs, action)
        executed = action.copy()
        if action_noise > 0:
            executed[:3] += rng.normal(0.0, action_noise, 3)
        env.step(executed)
        k += 1
    return env.success()
