"""Scripted expert: a top-down pick-and-place through Cartesian waypoints, as a feedback controller.

It reads the privileged sim state once (object poses, goal) to place the waypoints. Then, at every
control step, its action depends only on where the arm is now: move the commanded TCP target
toward the current waypoint at a capped speed, and go on to the next waypoint once the arm is
there (and, at the grasp and the release, once the gripper has closed or opened). Behaviour cloning
needs exactly this: the label is a function of what the policy can observe (the arm, the gripper,
the object), not of time since the episode started. An earlier, time-indexed min-jerk plan gave
labels that depended on the phase of a clock the policy never sees, and a policy that arrived a
little off could not tell whether to keep going or to stop (docs/model.md, attempts 1-6).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np

from edge_steer.geometry import orientation_error, rot_z, rotvec_to_mat
from edge_steer.sim.env import SimEnv

R_DOWN = np.diag([1.0, -1.0, -1.0])  # gripper pointing down, fingers opening along base y
APPROACH = 0.12    # m above grasp / place height
ROT_STEP = 0.15    # rad per control step


@dataclass(frozen=True)
class Waypoint:
    pos: np.ndarray
    yaw: float
    grip: float      # 1 = closed
    speed: float     # m per control step on the way to this waypoint
    tol: float       # m the measured TCP must be within before the next waypoint
    wait: str = ""   # "closed" / "open": also wait for the gripper

    @property
    def rot(self) -> np.ndarray:
        return rot_z(self.yaw) @ R_DOWN


def face_yaw(yaw: float) -> float:
    """A cube's yaw folded to the face closest to neutral, in [-pi/4, pi/4): the turn that squares the hand to it."""
    return float((yaw + np.pi / 4) % (np.pi / 2) - np.pi / 4)


def _grasp_yaw(env: SimEnv) -> float:
    if env.task.obj.shape != "cube":
        return 0.0
    m = env.world.object_mat(0)
    return face_yaw(np.arctan2(m[1, 0], m[0, 0]))


def grasp_width(env: SimEnv) -> float:
    """Width of the instructed object between the fingers (m), grasped square to a face."""
    o = env.task.obj
    return 2 * min(o.radius, o.half_height)


def widest_hold(env: SimEnv) -> float:
    """The widest the fingers stand on a held object (m): a cube gripped off its faces, as a policy
    that does not turn the hand grips it, spans up to its diagonal, and physics holds it so."""
    w = grasp_width(env)
    return w * np.sqrt(2.0) if env.task.obj.shape == "cube" else w


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
    grasp = np.array([obj[0], obj[1], z_grasp])
    place = np.array([gx, gy, z_place])
    up = np.array([0.0, 0.0, APPROACH])
    return [
        Waypoint(grasp + up, yaw, 0.0, 0.025, 0.015),
        Waypoint(grasp, yaw, 0.0, 0.012, 0.006),
        Waypoint(grasp, yaw, 1.0, 0.0, 0.006, wait="closed"),
        Waypoint(grasp + [0, 0, 0.15], yaw, 1.0, 0.015, 0.03),
        Waypoint(place + up, 0.0, 1.0, 0.025, 0.015),
        Waypoint(place, 0.0, 1.0, 0.012, 0.008),
        Waypoint(place, 0.0, 0.0, 0.0, 0.008, wait="open"),
        Waypoint(place + up, 0.0, 0.0, 0.02, 0.03),
    ]


def _plan_locked(env: SimEnv) -> list[Waypoint]:
    with env.world.lock:   # served in sim, the physics thread moves the objects meanwhile
        return plan(env)


class ScriptedExpert:
    """Follows `plan(env)`. If the fingers close to well under the object's width while lifting (a
    held sphere squeezes to ~80 % of its diameter, an empty grasp to ~0), the grasp missed: it opens
    where it is, reads the scene again and starts over from above the object, so a miss is recovered
    from rather than carried to the goal empty-handed."""
    MAX_HOLD = 8         # steps to wait at a waypoint for the arm or the gripper before going on anyway
    MISS_SHARE = 0.35    # fingers closed below this share of the object's width while lifting: a miss

    def __init__(self, env: SimEnv):
        self.waypoints = plan(env)
        self.width = grasp_width(env)
        self.phase = 0
        self.retries = 0
        self._hold = 0
        self._cruising = False
        self._replan = lambda: _plan_locked(env)   # a function: deepcopy (the chunk's ghost) shares it

    @classmethod
    def resume(cls, env: SimEnv) -> "ScriptedExpert":
        """An expert taking over mid-episode from whatever state another controller (a policy) left,
        with the phase read from the scene rather than from a history it did not see: holding the
        object, it carries it on (or lowers it, if already above the goal); not holding it, it
        descends if the hand is inside the cone above the object, else starts from above it. A
        gripper closed on nothing opens on the way, since neither phase closes it."""
        ex = cls(env)      # planned from the objects where they are now
        wps = ex.waypoints
        with env.world.lock:
            tcp = env.world.tcp_pose()[0]
            width = env.world.gripper_width
            obj = env.world.object_pos(0)
        held = (env.gripper_closed and ex.MISS_SHARE * ex.width < width <= widest_hold(env) + 0.006
                and np.linalg.norm(obj - tcp) < 0.025)
        if held:
            place = wps[5].pos
            if np.linalg.norm((tcp - place)[:2]) < 0.02 and tcp[2] < place[2] + APPROACH + 0.015:
                ex.phase = 5
            else:   # straight up first, as after a grasp, then over to the goal
                z = max(tcp[2], max(env.task.obj.half_height, 0.016) + 0.15)
                wps[3] = replace(wps[3], pos=np.array([tcp[0], tcp[1], z]))
                ex.phase = 3
        else:
            grasp = wps[1].pos
            rise = tcp[2] - grasp[2]
            inside = rise < APPROACH + 0.015 and np.linalg.norm((tcp - grasp)[:2]) < 0.01 + 0.2 * max(rise, 0.0)
            ex.phase = 1 if inside else 0
        return ex

    @property
    def lifting(self) -> bool:
        """On the way up from the grasp (the waypoint after the one that closes the gripper)."""
        return 0 < self.phase < len(self.waypoints) and self.waypoints[self.phase - 1].wait == "closed"

    @property
    def cruising(self) -> bool:
        """Far from the current waypoint (where injected noise cannot spoil an arrival)."""
        return self._cruising

    @property
    def done(self) -> bool:
        return self.phase >= len(self.waypoints)

    def _arrived(self, wp: Waypoint, target_p, target_r, measured_p, width) -> bool:
        commanded = np.linalg.norm(wp.pos - target_p) < 0.002 and np.linalg.norm(orientation_error(wp.rot, target_r)) < 0.01
        settled = np.linalg.norm(wp.pos - measured_p) < wp.tol
        gripper = {"closed": width <= self.width + 0.003, "open": width >= self.width + 0.012}.get(wp.wait, True)
        return commanded and (settled and gripper or self._hold >= self.MAX_HOLD)

    def act(self, target_p: np.ndarray, target_r: np.ndarray, measured_p: np.ndarray, width: float) -> np.ndarray:
        """The action from the commanded target (target_p, target_r), the measured TCP position and
        the gripper width; advances the expert's waypoint when the arm has arrived."""
        if self._replan is not None and self.lifting and width < self.MISS_SHARE * self.width:
            wp = self.waypoints[self.phase]
            self.waypoints = [Waypoint(np.array(target_p, float), wp.yaw, 0.0, 0.0, 1.0, wait="open"), *self._replan()]
            self.phase, self._hold = 0, 0
            self.retries += 1
        while not self.done and self._arrived(self.waypoints[self.phase], target_p, target_r, measured_p, width):
            self.phase, self._hold = self.phase + 1, 0
        wp = self.waypoints[min(self.phase, len(self.waypoints) - 1)]
        if self.done:
            return np.concatenate([np.zeros(6), [wp.grip]]).astype(np.float32)
        d = wp.pos - target_p
        dist = float(np.linalg.norm(d))
        # cruise at the waypoint's speed, halve the remaining distance near it, arrive exactly
        step = min(wp.speed, max(0.5 * dist, 0.003)) if wp.speed > 0 else dist
        dp = d if step >= dist else d * (step / dist)
        rv = orientation_error(wp.rot, target_r)
        angle = float(np.linalg.norm(rv))
        if angle > ROT_STEP:
            rv = rv * (ROT_STEP / angle)
        self._cruising = dist > 0.03
        if step >= dist and angle <= ROT_STEP:
            self._hold += 1
        return np.concatenate([dp, rv, [wp.grip]]).astype(np.float32)

    def act_env(self, env: SimEnv) -> np.ndarray:
        p, r = env.target
        with env.world.lock:
            measured = env.world.tcp_pose()[0]
            width = env.world.gripper_width
        return self.act(p, r, measured, width)

    def chunk(self, target_p, target_r, measured_p, width, n: int) -> np.ndarray:
        """n actions: this step's (which advances the expert), then the next ones predicted on a copy,
        assuming the arm follows its target and the gripper stays as it is."""
        out = [self.act(target_p, target_r, measured_p, width)]
        ghost = copy.deepcopy(self)
        ghost._replan = None   # it assumes the gripper stays as it is: no miss to detect
        p, r = target_p, target_r
        for _ in range(n - 1):
            a = out[-1]
            p, r = p + a[:3], rotvec_to_mat(a[3:6]) @ r
            out.append(ghost.act(p, r, p, width))
        return np.stack(out)


PUSH_STEPS = 3
SETTLE_STEPS = 3
DESCENT_SHOVE_HEIGHT = 0.05   # m above the grasp height at which the descent shove lands


@dataclass(frozen=True)
class Perturbation:
    """Unrecorded disturbances of a demo, so that the recorded (clean) labels hold corrections a
    policy needs when it is off the expert's path (DART-style). Zero everywhere: a clean demo.

    `action_noise` (m, per step): Gaussian noise on the executed translation, only while cruising
    (near a waypoint it would keep the arm from ever settling there). `push` (m): once before the
    grasp, a sideways shove of that much, so the demos hold corrections from well off the path.
    `approach_push` (m): in `approach_share` of the episodes, a shove of up to that much once the arm
    is above the object, so the descent holds the last-centimetre corrections that the wrist camera
    sees. `descent_push` (m): in every episode, a shove of up to that much when the commanded TCP is
    `DESCENT_SHOVE_HEIGHT` above the grasp, where a policy that arrives a few cm off must still
    correct sideways before a finger lands on the object. `miss` (m): in `miss_share` of the
    episodes the first grasp is aimed 0.75-1x that far off the object and is not recorded; the demo
    starts when the expert has found its fingers closed on nothing, so it shows the recovery (open,
    back up, re-centre, grasp) that a policy which closed beside the object needs."""
    action_noise: float = 0.0
    push: float = 0.0
    approach_push: float = 0.0
    approach_share: float = 0.75
    descent_push: float = 0.0
    miss: float = 0.0
    miss_share: float = 0.5

    def __post_init__(self):
        for name in ("action_noise", "push", "approach_push", "descent_push", "miss"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 (m), got {getattr(self, name)}")
        for name in ("approach_share", "miss_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def run_expert_episode(env: SimEnv, record=None, perturb: Perturbation = Perturbation(),
                       rng: np.random.Generator | None = None, expert: ScriptedExpert | None = None) -> bool:
    """Run the expert until it has retreated from the placed object; `record(obs, action)` is called at
    each step with the clean expert action, whatever `perturb` then does to what is executed; the
    expert's next action, computed from where the arm is, corrects it. `expert`: one already under
    way (`ScriptedExpert.resume` after a policy drove the first part of the episode)."""
    expert = expert or ScriptedExpert(env)
    rng = rng or np.random.default_rng(env.seed)
    # the draws below happen only for the perturbations asked for: older seeds replay as before
    push_at = int(rng.integers(2, 25)) if perturb.push > 0 else -1
    shove = _shove(perturb.push, rng.uniform(0.0, 2 * np.pi))
    late = perturb.approach_push > 0 and rng.random() < perturb.approach_share
    late_shove = _shove(perturb.approach_push * rng.uniform(0.3, 1.0), rng.uniform(0.0, 2 * np.pi)) if late else None
    low = perturb.descent_push > 0
    low_shove = _shove(perturb.descent_push * rng.uniform(0.3, 1.0), rng.uniform(0.0, 2 * np.pi)) if low else None
    grasp_z = expert.waypoints[1].pos[2]
    miss = perturb.miss > 0 and rng.random() < perturb.miss_share
    if miss:   # aim the first grasp (above, down, close) beside the object
        a, d = rng.uniform(0.0, 2 * np.pi), perturb.miss * rng.uniform(0.75, 1.0)
        off = np.array([d * np.cos(a), d * np.sin(a), 0.0])
        expert.waypoints = [replace(w, pos=w.pos + off) if i < 3 else w for i, w in enumerate(expert.waypoints)]
    settle = 0
    while env.steps < env.config.max_steps and settle < SETTLE_STEPS:
        if env.steps == push_at and expert.phase <= 1:
            _push(env, shove)
            continue
        if late and expert.phase == 1:   # just arrived above the object
            late = False
            _push(env, late_shove)
            continue
        if low and expert.phase == 1 and env.target[0][2] < grasp_z + DESCENT_SHOVE_HEIGHT:
            low = False
            _push(env, low_shove)
            continue
        action = expert.act_env(env)   # acting does not step the env: observing after it sees the same
        if record is not None and not (miss and expert.retries == 0):
            record(env.observe(), action)
        executed = action.copy()
        if perturb.action_noise > 0 and expert.cruising:
            executed[:3] += rng.normal(0.0, perturb.action_noise, 3)
        env.step(executed)
        settle += expert.done
    return env.success() and not (miss and expert.retries == 0)   # a miss demo must show a recovery


def _shove(distance: float, angle: float) -> np.ndarray:
    """One step's share of a sideways shove of `distance` m toward `angle` (an action)."""
    a = np.zeros(7, dtype=np.float32)
    a[:2] = distance / PUSH_STEPS * np.array([np.cos(angle), np.sin(angle)])
    return a


def _push(env: SimEnv, shove: np.ndarray) -> None:
    for _ in range(PUSH_STEPS):  # unrecorded: the expert never pushes
        env.step(shove)
