"""The task family: one registry of base tasks (for pretraining) and held-out variants.

A task is an instruction template over (object, relation, target, environment) plus a success
predicate read from the sim state. Held-out variants each change one factor of a base task:

* entity — an object kind or colour never seen in the base tasks;
* environment — lighting, table, distractors, camera pose;
* spatial — a relation never seen in the base tasks.

Relations are from the robot's point of view (robot at the origin facing +x): "left of" is +y,
"in front of" is nearer the robot (-x), "behind" is farther from it (+x).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace

import numpy as np

from edge_steer.sim.scene import COLORS, GRASPABLE, RECEPTACLES, Entity, EnvSpec, Placement, SceneSpec
from edge_steer.sim.world import World

RELATIONS = {"on": "on", "in": "in", "left_of": "to the left of", "right_of": "to the right of",
             "front_of": "in front of", "behind": "behind"}
_AXIS = {"left_of": (1, +1), "right_of": (1, -1), "front_of": (0, -1), "behind": (0, +1)}  # (axis, sign)
OBJ_REGION = ((0.38, 0.62), (-0.20, 0.20))   # where objects are spawned (x, y ranges)
REACH = ((0.30, 0.72), (-0.30, 0.30))        # where a placement goal may lie
BASE_COLORS = ("red", "green", "blue", "yellow", "white")
FACTORS = ("entity", "environment", "spatial")


class TaskError(ValueError):
    pass


@dataclass(frozen=True)
class SceneInstance:
    """A sampled episode layout: object 0 is the one to move, object 1 the reference."""

    spec: SceneSpec
    goal_xy: tuple[float, float]   # where the expert will put object 0


@dataclass(frozen=True)
class Task:
    name: str
    obj: Entity
    relation: str
    target: Entity
    env: EnvSpec = field(default_factory=EnvSpec)
    split: str = "base"                # "base" | "heldout"
    factor: str | None = None          # held-out factor
    base: str | None = None            # base task a variant departs from

    def __post_init__(self):
        if self.relation not in RELATIONS:
            raise TaskError(f"unknown relation {self.relation!r}; choose from {sorted(RELATIONS)}")
        if self.obj.shape not in GRASPABLE:
            raise TaskError(f"{self.obj.shape!r} cannot be picked; graspable shapes are {GRASPABLE}")
        if self.relation in ("on", "in") and self.target.shape not in RECEPTACLES:
            raise TaskError(f"'{self.relation}' needs a receptacle target {RECEPTACLES}, got {self.target.shape!r}")
        if self.relation == "in" and self.target.shape != "bowl":
            raise TaskError("'in' needs a bowl target")
        if self.relation == "on" and self.target.shape != "plate":
            raise TaskError("'on' needs a plate target")

    @property
    def instruction(self) -> str:
        return f"put the {self.obj.name} {RELATIONS[self.relation]} the {self.target.name}"

    def vary(self, **changes) -> "Task":
        """A copy with environment fields (lighting, table, distractors, camera_jitter, spawn_margin) or entity
        fields (object_color, object_shape, object_size, target_color, ...) changed; validated."""
        env_fields = {k: v for k, v in changes.items() if k in EnvSpec.__dataclass_fields__}
        ent = {k: v for k, v in changes.items() if k not in env_fields}
        obj, target = self.obj, self.target
        for key, value in ent.items():
            who, _, attr = key.partition("_")
            if who not in ("object", "target") or attr not in ("shape", "color", "size"):
                raise TaskError(f"unknown variation {key!r}; use EnvSpec fields or object_/target_ shape|color|size")
            if who == "object":
                obj = replace(obj, **{attr: value})
            else:
                target = replace(target, **{attr: value})
        return replace(self, obj=obj, target=target, env=replace(self.env, **env_fields),
                       name=self.name + ("+" + ",".join(f"{k}={v}" for k, v in changes.items()) if changes else ""))

    # --- sampling --------------------------------------------------------------------------------
    def goal_offset(self) -> np.ndarray:
        if self.relation in ("on", "in"):
            return np.zeros(2)
        axis, sign = _AXIS[self.relation]
        off = np.zeros(2)
        off[axis] = sign * (self.target.radius + self.obj.radius + 0.035)
        return off

    def sample_scene(self, rng: np.random.Generator, image_size: int = 128, max_tries: int = 500) -> SceneInstance:
        distractors = [_distractor(rng, (self.obj, self.target)) for _ in range(self.env.distractors)]
        m = self.env.spawn_margin   # 0 draws exactly as before: the same scenes for the same seed
        region = tuple((lo - m, hi + m) for lo, hi in OBJ_REGION)
        for _ in range(max_tries):
            t_xy = _uniform(rng, region)
            goal = t_xy + self.goal_offset()
            if not _inside(goal, REACH):
                continue
            o_xy = _uniform(rng, region)
            placed = [(t_xy, self.target.radius), (goal, self.obj.radius)]
            if not _clear(o_xy, self.obj.radius, placed):
                continue
            placed.append((o_xy, self.obj.radius))
            spots = []
            for d in distractors:
                for _ in range(50):
                    xy = _uniform(rng, ((0.33, 0.68), (-0.26, 0.26)))
                    if _clear(xy, d.radius, placed):
                        placed.append((xy, d.radius))
                        spots.append(xy)
                        break
                else:
                    break
            if len(spots) < len(distractors):
                continue
            yaw = lambda: float(rng.uniform(-np.pi, np.pi))  # noqa: E731
            objects = (Placement(self.obj, tuple(o_xy), yaw()), Placement(self.target, tuple(t_xy), yaw()),
                       *(Placement(d, tuple(xy), yaw()) for d, xy in zip(distractors, spots)))
            jitter = tuple(rng.normal(0.0, self.env.camera_jitter, 3)) if self.env.camera_jitter else (0.0, 0.0, 0.0)
            spec = SceneSpec(objects=objects, env=self.env, light_scale=float(rng.uniform(0.85, 1.15)),
                             camera_offset=jitter, image_size=image_size)
            return SceneInstance(spec=spec, goal_xy=tuple(goal))
        raise TaskError(f"could not lay out task {self.name!r} in {max_tries} tries (too many distractors?)")

    def find_in(self, spec: SceneSpec) -> tuple[int, int] | None:
        """Where this task's object and target stand in another task's scene (first match of each, as
        scene object indices), or None where the scene lacks either: then the task cannot be done there."""
        kinds = [(p.entity.shape, p.entity.color) for p in spec.objects]
        obj, target = (self.obj.shape, self.obj.color), (self.target.shape, self.target.color)
        if obj not in kinds or target not in kinds:
            return None
        return kinds.index(obj), kinds.index(target)

    # --- success -----------------------------------------------------------------------------------
    def success(self, world: World, obj: int = 0, target: int = 1) -> bool:
        """Object `obj` (0: the scene's own) rests, released, in the instructed relation to object `target`."""
        if world.object_speed(obj) > 0.05 or world.fingers_touch(obj):
            return False
        o, t = world.object_pos(obj), world.object_pos(target)
        d = o[:2] - t[:2]
        if self.relation in ("on", "in"):
            return bool(np.linalg.norm(d) < self.target.inner_radius and t[2] < o[2] < t[2] + 0.08)
        if o[2] > self.obj.half_height + 0.02:  # must stand on the table, not be held or stacked
            return False
        axis, sign = _AXIS[self.relation]
        along, across = sign * d[axis], abs(d[1 - axis])
        near = self.target.radius + self.obj.radius * 0.5
        return bool(near <= along <= near + 0.12 and across < 0.06)


def _uniform(rng, region) -> np.ndarray:
    return np.array([rng.uniform(*region[0]), rng.uniform(*region[1])])


def _inside(xy, region) -> bool:
    return region[0][0] <= xy[0] <= region[0][1] and region[1][0] <= xy[1] <= region[1][1]


def _clear(xy, r, placed, margin: float = 0.03) -> bool:
    return all(np.linalg.norm(xy - p) > r + pr + margin for p, pr in placed)


def _distractor(rng, avoid: tuple[Entity, ...]) -> Entity:
    while True:
        e = Entity(str(rng.choice(GRASPABLE)), str(rng.choice(BASE_COLORS)))
        if all((e.shape, e.color) != (a.shape, a.color) for a in avoid):
            return e


def _registry() -> dict[str, Task]:
    E = Entity
    base = [
        Task("red_cube_on_blue_plate", E("cube", "red"), "on", E("plate", "blue")),
        Task("green_cylinder_in_yellow_bowl", E("cylinder", "green"), "in", E("bowl", "yellow")),
        Task("blue_cube_in_white_bowl", E("cube", "blue"), "in", E("bowl", "white")),
        Task("green_cube_on_yellow_plate", E("cube", "green"), "on", E("plate", "yellow")),
        Task("yellow_cube_left_of_red_plate", E("cube", "yellow"), "left_of", E("plate", "red")),
        Task("red_cylinder_right_of_blue_bowl", E("cylinder", "red"), "right_of", E("bowl", "blue")),
        Task("blue_cylinder_on_red_plate", E("cylinder", "blue"), "on", E("plate", "red")),
        Task("white_cube_left_of_green_bowl", E("cube", "white"), "left_of", E("bowl", "green")),
    ]
    t = {x.name: x for x in base}
    held = [
        # entity: colours (purple, orange) and a shape (sphere) that no base task shows
        replace(t["green_cylinder_in_yellow_bowl"], name="purple_cylinder_in_yellow_bowl",
                obj=E("cylinder", "purple"), split="heldout", factor="entity", base="green_cylinder_in_yellow_bowl"),
        replace(t["red_cube_on_blue_plate"], name="orange_sphere_on_blue_plate", obj=E("sphere", "orange"),
                split="heldout", factor="entity", base="red_cube_on_blue_plate"),
        # environment: same instruction, different world
        replace(t["red_cube_on_blue_plate"], name="red_cube_on_blue_plate_dim_wood",
                env=EnvSpec(lighting="dim", table="wood"), split="heldout", factor="environment",
                base="red_cube_on_blue_plate"),
        replace(t["green_cylinder_in_yellow_bowl"], name="green_cylinder_in_yellow_bowl_clutter",
                env=EnvSpec(table="checker", distractors=3, camera_jitter=0.03), split="heldout",
                factor="environment", base="green_cylinder_in_yellow_bowl"),
        # spatial: relations no base task uses
        Task("red_cube_in_front_of_blue_plate", E("cube", "red"), "front_of", E("plate", "blue"),
             split="heldout", factor="spatial", base="red_cube_on_blue_plate"),
        Task("blue_cube_behind_white_bowl", E("cube", "blue"), "behind", E("bowl", "white"),
             split="heldout", factor="spatial", base="blue_cube_in_white_bowl"),
    ]
    return {**t, **{x.name: x for x in held}}


TASKS: dict[str, Task] = _registry()


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(name, TASKS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " Run `edge-steer tasks list`."
        raise TaskError(f"unknown task {name!r}.{hint}") from None


def task_for_instruction(text: str) -> Task | None:
    """The task an instruction names: a registered task with that instruction (the first, so a base task
    before its environment variants, which share it), else one read from the instruction template
    ("put the [size] COLOUR SHAPE RELATION the [size] COLOUR SHAPE"); None if it names no valid task."""
    said = " ".join(text.lower().strip().rstrip(".").split())
    if known := next((t for t in TASKS.values() if t.instruction == said), None):
        return known
    entity = r"(?:(?:small|large) )?(\w+) (\w+)"   # sizes are not told apart: find_in matches colour and shape
    phrases = "|".join(re.escape(p) for p in RELATIONS.values())
    m = re.fullmatch(f"put the {entity} ({phrases}) the {entity}", said)
    if m is None:
        return None
    relation = next(k for k, v in RELATIONS.items() if v == m[3])
    try:
        return Task(f"instructed: {said}", Entity(m[2], m[1]), relation, Entity(m[5], m[4]))
    except (TaskError, ValueError):
        return None


def tasks_by_split(split: str) -> list[Task]:
    if split not in ("base", "heldout"):
        raise TaskError("split must be 'base' or 'heldout'")
    return [t for t in TASKS.values() if t.split == split]


assert set(COLORS) >= set(BASE_COLORS)
