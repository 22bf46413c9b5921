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

from edge_steer.sim.scene import COLORS, GRASPABLE, RECEPTACLES, SHAPES, Entity, EnvSpec, Placement, SceneSpec
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

    @property
    def suite(self) -> str:
        return "v1"

    @property
    def instructions(self) -> tuple[str, ...]:
        """Every wording the task is given (one in suite v1; see V2Task)."""
        return (self.instruction,)

    def instruction_for(self, seed: int) -> str:
        """The wording an episode with this scene seed is given (demos record it)."""
        return self.instruction

    def template_index(self, seed: int) -> int | None:
        """Which of the task's templates `instruction_for(seed)` used; None for a one-wording task."""
        return None

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
        return _goal_offset(self.obj, self.relation, self.target)

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


def _goal_offset(obj: Entity, relation: str, target: Entity) -> np.ndarray:
    """Where the expert puts `obj` relative to `target`'s centre (xy, m)."""
    if relation in ("on", "in"):
        return np.zeros(2)
    axis, sign = _AXIS[relation]
    off = np.zeros(2)
    off[axis] = sign * (target.radius + obj.radius + 0.035)
    return off


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
        return ALL_TASKS[name]   # every suite's (v2 names start with `v2-`)
    except KeyError:
        close = difflib.get_close_matches(name, ALL_TASKS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " Run `edge-steer tasks list`."
        raise TaskError(f"unknown task {name!r}.{hint}") from None


def tasks_by_split(split: str) -> list[Task]:
    if split not in ("base", "heldout"):
        raise TaskError("split must be 'base' or 'heldout'")
    return [t for t in TASKS.values() if t.split == split]


assert set(COLORS) >= set(BASE_COLORS)


# --- suite v2: scenes of several candidates, where the instruction decides the task --------------------------
#
# A v2 scene shows a *cast*: three graspable candidates and two receptacles. Several tasks share a cast, one
# per candidate, so the scene alone does not say which object goes where: only the instruction does. Each
# cast holds two candidates of one shape (told apart by colour) and two of one colour (told apart by shape).
# A cast is laid out the same way for each of its tasks (the same seed gives the same scene whichever task
# draws it), with every one of its tasks' goals clear and in reach, so any of them can be instructed on it.
# Objects are ordered per task (its object first, its target second), which is what the expert reads.

TRAIN_TEMPLATES = (
    "put the {obj} {rel} the {target}",
    "place the {obj} {rel} the {target}",
    "pick up the {obj} and put it {rel} the {target}",
    "move the {obj} so that it is {rel} the {target}",
)
HELDOUT_TEMPLATES = (   # wordings no v2 training demo uses (the "wording" held-out factor)
    "could you set the {obj} {rel} the {target}",
    "grab the {obj} and leave it {rel} the {target}",
)
V2_FACTORS = ("composition", "environment", "wording")
Job = tuple[Entity, str, Entity]   # (object, relation, target)


@dataclass(frozen=True)
class Cast:
    """What a v2 scene shows: graspable candidates and receptacles, and the jobs (object, relation,
    target) whose goals each layout keeps clear and in reach."""

    name: str
    candidates: tuple[Entity, ...]
    receptacles: tuple[Entity, ...]
    jobs: tuple[Job, ...]

    def __post_init__(self):
        ents = self.entities
        if len(set(ents)) != len(ents):
            raise TaskError(f"cast {self.name}: an entity appears twice (an instruction could not name it)")
        if (any(e.shape not in GRASPABLE for e in self.candidates)
                or any(e.shape not in RECEPTACLES for e in self.receptacles)):
            raise TaskError(f"cast {self.name}: candidates must be graspable and receptacles bowls or plates")
        for o, _, t in self.jobs:
            if o not in self.candidates or t not in self.receptacles:
                raise TaskError(f"cast {self.name}: job {o.name} -> {t.name} names an entity the cast lacks")

    @property
    def entities(self) -> tuple[Entity, ...]:
        return self.candidates + self.receptacles


@dataclass(frozen=True)
class V2Task(Task):
    """A task of suite v2: one job of a cast, worded by one of `templates` per episode (drawn from the
    scene seed, so an episode's wording is reproducible and demos record which one they used)."""

    cast: Cast | None = None
    templates: tuple[str, ...] = TRAIN_TEMPLATES

    @property
    def suite(self) -> str:
        return "v2"

    def __post_init__(self):
        super().__post_init__()
        if not self.templates:
            raise TaskError(f"{self.name}: a v2 task needs at least one instruction template")
        if self.cast is not None and (self.obj, self.relation, self.target) not in self.cast.jobs:
            raise TaskError(f"{self.name}: not a job of cast {self.cast.name}")

    def _word(self, template: str) -> str:
        return template.format(obj=self.obj.name, rel=RELATIONS[self.relation], target=self.target.name)

    @property
    def instruction(self) -> str:
        """The canonical wording (the first template)."""
        return self._word(self.templates[0])

    @property
    def instructions(self) -> tuple[str, ...]:
        return tuple(self._word(t) for t in self.templates)

    def template_index(self, seed: int) -> int:
        return int(np.random.default_rng([seed, 0x7E]).integers(len(self.templates)))

    def instruction_for(self, seed: int) -> str:
        return self._word(self.templates[self.template_index(seed)])

    def sample_scene(self, rng: np.random.Generator, image_size: int = 128, max_tries: int = 500) -> SceneInstance:
        if self.cast is None:
            raise TaskError(f"{self.name} has no cast to lay out (a task read from an instruction)")
        clutter = [_distractor(rng, self.cast.entities) for _ in range(self.env.distractors)]
        m = self.env.spawn_margin
        region = tuple((lo - m, hi + m) for lo, hi in OBJ_REGION)
        for _ in range(max_tries):
            if (laid := self._lay_out(rng, region, clutter)) is not None:
                return self._scene(rng, clutter, *laid, image_size)
        raise TaskError(f"could not lay out task {self.name!r} in {max_tries} tries")

    def _lay_out(self, rng, region, clutter):
        """One try: the receptacles, then the spots beside them that the cast's jobs need, then the candidates
        and the clutter, each clear of what is already placed; (positions, goals), or None."""
        cast = self.cast
        placed: list[tuple[np.ndarray, float]] = []
        where: dict[Entity, np.ndarray] = {}
        for e in cast.receptacles:
            if (xy := _spot(rng, region, e.radius, placed)) is None:
                return None
            where[e] = xy
            placed.append((xy, e.radius))
        goals = {job: where[job[2]] + _goal_offset(*job) for job in cast.jobs}
        if not all(_inside(g, REACH) for g in goals.values()):
            return None
        beside = [(g, o.radius) for (o, r, _), g in goals.items() if r not in ("on", "in")]
        if not all(_clear(g, r, placed + beside[:k]) for k, (g, r) in enumerate(beside)):
            return None   # a spot beside a receptacle must be clear of the other one and of the other spots
        placed += beside
        for e in (*cast.candidates, *clutter):
            if (xy := _spot(rng, ((0.33, 0.68), (-0.26, 0.26)) if e in clutter else region, e.radius, placed)) is None:
                return None
            where[e] = xy
            placed.append((xy, e.radius))
        return where, goals

    def _scene(self, rng, clutter, where, goals, image_size) -> SceneInstance:
        # yaws and the rest are drawn in cast order, so every task of the cast draws the same scene
        laid = [Placement(e, tuple(where[e]), float(rng.uniform(-np.pi, np.pi)))
                for e in (*self.cast.entities, *clutter)]
        first = {self.obj: 0, self.target: 1}
        objects = tuple(sorted(laid, key=lambda p: first.get(p.entity, 2)))   # stable: the rest keep cast order
        jitter = tuple(rng.normal(0.0, self.env.camera_jitter, 3)) if self.env.camera_jitter else (0.0, 0.0, 0.0)
        spec = SceneSpec(objects=objects, env=self.env, light_scale=float(rng.uniform(0.85, 1.15)),
                         camera_offset=jitter, image_size=image_size)
        return SceneInstance(spec=spec, goal_xy=tuple(goals[(self.obj, self.relation, self.target)]))

    def success(self, world: World, obj: int | None = None, target: int | None = None) -> bool:
        """As `Task.success`, with the object and target found in the world's scene by default: a v2 task
        (or one read from an instruction) can be checked on another task's scene."""
        if obj is None or target is None:
            where = self.find_in(world.spec)
            if where is None:
                raise TaskError(f"{self.name}: the scene lacks {self.obj.name} or {self.target.name}")
            obj, target = where
        return super().success(world, obj, target)


def _spot(rng, region, r: float, placed, tries: int = 50) -> np.ndarray | None:
    for _ in range(tries):
        xy = _uniform(rng, region)
        if _clear(xy, r, placed):
            return xy
    return None


def _v2_registry() -> dict[str, V2Task]:
    E = Entity
    red_cube, green_cube, blue_cube, yellow_cube = (E("cube", c) for c in ("red", "green", "blue", "yellow"))
    red_cyl, green_cyl, blue_cyl, yellow_cyl = (E("cylinder", c) for c in ("red", "green", "blue", "yellow"))
    red_sph, blue_sph, yellow_sph, green_sph = (E("sphere", c) for c in ("red", "blue", "yellow", "green"))
    plate = {c: E("plate", c) for c in ("blue", "yellow", "red", "green")}
    bowl = {c: E("bowl", c) for c in ("white", "green", "yellow", "blue")}
    # base jobs: each relation three times, every candidate and receptacle of a cast in some job;
    # no base job moves a cylinder behind anything, and no base scene shows a green sphere
    casts = [
        Cast("k1", (red_cube, green_cube, red_cyl), (plate["blue"], bowl["white"]),
             ((red_cube, "on", plate["blue"]), (green_cube, "in", bowl["white"]), (red_cyl, "left_of", plate["blue"]),
              (red_cyl, "behind", plate["blue"]))),   # the last: held out (relation-object composition)
        Cast("k2", (blue_cube, blue_sph, yellow_cube), (plate["yellow"], bowl["green"]),
             ((blue_cube, "right_of", bowl["green"]), (blue_sph, "on", plate["yellow"]),
              (yellow_cube, "behind", plate["yellow"]))),
        Cast("k3", (green_cyl, yellow_cyl, green_cube), (plate["red"], bowl["white"]),
             ((green_cyl, "in", bowl["white"]), (yellow_cyl, "front_of", plate["red"]),
              (green_cube, "left_of", bowl["white"]))),
        Cast("k4", (red_sph, yellow_sph, red_cube), (plate["blue"], bowl["yellow"]),
             ((red_sph, "in", bowl["yellow"]), (yellow_sph, "behind", plate["blue"]),
              (red_cube, "right_of", bowl["yellow"]))),
        Cast("k5", (blue_cyl, red_cyl, blue_cube), (plate["green"], bowl["white"]),
             ((blue_cyl, "on", plate["green"]), (red_cyl, "right_of", bowl["white"]),
              (blue_cube, "front_of", plate["green"]))),
        Cast("k6", (yellow_cube, green_cyl, yellow_cyl), (plate["red"], bowl["blue"]),
             ((yellow_cube, "behind", plate["red"]), (green_cyl, "left_of", bowl["blue"]),
              (yellow_cyl, "front_of", bowl["blue"]))),
        # held out only: the green sphere beside a green cube and a blue sphere (attribute-object composition)
        Cast("kc", (green_sph, green_cube, blue_sph), (bowl["white"], plate["yellow"]),
             ((green_sph, "in", bowl["white"]),)),
    ]
    by_name = {c.name: c for c in casts}
    no_clutter = EnvSpec(distractors=0)

    def name(job: Job) -> str:
        o, r, t = job
        return f"v2-{o.color}_{o.shape}_{'in_front_of' if r == 'front_of' else r}_{t.color}_{t.shape}"

    def task(job: Job, cast: str, **kw) -> V2Task:
        return V2Task(kw.pop("name", name(job)), *job, env=kw.pop("env", no_clutter), cast=by_name[cast], **kw)

    held_jobs = {(red_cyl, "behind", plate["blue"]), (green_sph, "in", bowl["white"])}
    base = [task(j, c.name) for c in casts for j in c.jobs if j not in held_jobs]
    t = {x.name: x for x in base}

    def variant(of: str, suffix: str, factor: str, **kw) -> V2Task:
        b = t[of]
        return replace(b, name=b.name + suffix, split="heldout", factor=factor, base=b.name, **kw)

    held = [
        task((green_sph, "in", bowl["white"]), "kc", split="heldout", factor="composition",
             base="v2-green_cube_in_white_bowl"),
        task((red_cyl, "behind", plate["blue"]), "k1", split="heldout", factor="composition",
             base="v2-red_cylinder_left_of_blue_plate"),
        variant("v2-red_cube_on_blue_plate", "_dim_wood", "environment",
                env=EnvSpec(lighting="dim", table="wood", distractors=0)),
        variant("v2-green_cylinder_in_white_bowl", "_clutter", "environment",
                env=EnvSpec(table="checker", distractors=2, camera_jitter=0.03)),
        variant("v2-blue_sphere_on_yellow_plate", "_reworded", "wording", templates=HELDOUT_TEMPLATES[:1]),
        variant("v2-green_cylinder_left_of_blue_bowl", "_reworded", "wording", templates=HELDOUT_TEMPLATES[1:]),
    ]
    return {**t, **{x.name: x for x in held}}


V2_TASKS: dict[str, V2Task] = _v2_registry()
SUITES: dict[str, dict[str, Task]] = {"v1": TASKS, "v2": V2_TASKS}
ALL_TASKS: dict[str, Task] = {name: t for suite in SUITES.values() for name, t in suite.items()}


def suite_tasks(suite: str, split: str | None = None) -> list[Task]:
    """A suite's tasks (`tasks_by_split` is suite v1's), all or one split's."""
    if suite not in SUITES:
        raise TaskError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    if split not in (None, "base", "heldout"):
        raise TaskError("split must be 'base' or 'heldout'")
    return [t for t in SUITES[suite].values() if split is None or t.split == split]


def resolve_tasks(spec: str) -> list[Task]:
    """Tasks by what a command line names: `base` / `heldout` (suite v1), `v2-base` / `v2-heldout`,
    or comma-separated task names of any suite."""
    suite, _, split = spec.partition("-") if spec in ("v2-base", "v2-heldout") else ("v1", "", spec)
    if split in ("base", "heldout"):
        return suite_tasks(suite, split)
    return [get_task(n.strip()) for n in spec.split(",")]


# --- which task an instruction means on a scene ----------------------------------------------------------------
_RELATION_WORDS = sorted([
    (("to", "the", "left", "of"), "left_of"), (("left", "of"), "left_of"),
    (("to", "the", "right", "of"), "right_of"), (("right", "of"), "right_of"),
    (("in", "front", "of"), "front_of"), (("behind",), "behind"),
    (("on", "top", "of"), "on"), (("onto",), "on"), (("on",), "on"),
    (("into",), "in"), (("inside",), "in"), (("in",), "in"),
], key=lambda p: -len(p[0]))


def parse_instruction(instruction: str) -> tuple[list[Entity], set[str]]:
    """The entities ("<colour> <shape>", in order of mention) and relations an instruction names."""
    words = re.findall(r"[a-z]+", instruction.lower())
    ents = [Entity(s, c) for c, s in zip(words, words[1:]) if c in COLORS and s in SHAPES]
    rels, i = set(), 0
    while i < len(words):
        for phrase, rel in _RELATION_WORDS:
            if tuple(words[i:i + len(phrase)]) == phrase:
                rels.add(rel)
                i += len(phrase)
                break
        else:
            i += 1
    return ents, rels


def instructed_task(scene: SceneSpec | SceneInstance, instruction: str) -> Task | None:
    """The task `instruction` asks for on `scene`, whatever task the scene was drawn for, or None.

    The instruction must name exactly one graspable object and one receptacle of the scene (by colour and
    shape, each present once) and one relation (any wording: "to the left of", "left of", "onto", "into",
    "inside", "on top of", "in front of", "behind", "on", "in"). The answer is the registry task of that
    (object, relation, target) whose environment is the scene's (a base task before a variant), else a task
    made for it; its `success(world)` finds both entities in the scene by identity, so it can be checked on
    a world built from `scene` (a v1 task only on its own scenes, where they are objects 0 and 1). None when
    the instruction names something the scene lacks or holds twice, no or several relations, or a relation
    the target cannot take ("in" a plate, "on" a bowl)."""
    spec = scene.spec if isinstance(scene, SceneInstance) else scene
    ents, rels = parse_instruction(instruction)
    kinds = [(p.entity.shape, p.entity.color) for p in spec.objects]   # instructions tell no sizes apart
    if len(rels) != 1 or not ents or any(kinds.count((e.shape, e.color)) != 1 for e in ents):
        return None
    present = [p.entity for p in spec.objects]
    ents = [present[kinds.index((e.shape, e.color))] for e in ents]     # the scene's own, sizes included
    objs = [e for e in dict.fromkeys(ents) if e.shape in GRASPABLE]
    targets = [e for e in dict.fromkeys(ents) if e.shape in RECEPTACLES]
    if len(objs) != 1 or len(targets) != 1:
        return None
    job = (objs[0], rels.pop(), targets[0])
    known = [t for t in ALL_TASKS.values() if (t.obj, t.relation, t.target, t.env) == (*job, spec.env)]
    for t in sorted(known, key=lambda t: t.split != "base"):
        if t.suite == "v2" or present[:2] == [job[0], job[2]]:   # a v1 task reads objects 0 and 1
            return t
    try:
        return V2Task("instructed:" + "_".join((job[0].color, job[0].shape, job[1], job[2].color, job[2].shape)),
                      *job, env=spec.env, split="instructed")
    except TaskError:
        return None
