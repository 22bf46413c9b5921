"""Suite v2 (the instruction decides the task) beside suite v1, which must not change."""

import numpy as np
import pytest

from edge_steer.sim.env import EnvConfig, SimEnv
from edge_steer.sim.expert import run_expert_episode
from edge_steer.sim.scene import GRASPABLE, RECEPTACLES, Entity, EnvSpec, Placement, SceneSpec
from edge_steer.sim.tasks import (HELDOUT_TEMPLATES, REACH, RELATIONS, SUITES, TASKS, TRAIN_TEMPLATES, V2_FACTORS,
                                  V2_TASKS, TaskError, V2Task, get_task, instructed_task, resolve_tasks,
                                  suite_tasks, tasks_by_split)
from edge_steer.sim.world import World

V2_BASE = suite_tasks("v2", "base")
V2_HELD = suite_tasks("v2", "heldout")

# --- v1 stays as it was (values computed from the code before suite v2 was added) ------------------------

V1_TASKS = [
    ("red_cube_on_blue_plate", "base", None), ("green_cylinder_in_yellow_bowl", "base", None),
    ("blue_cube_in_white_bowl", "base", None), ("green_cube_on_yellow_plate", "base", None),
    ("yellow_cube_left_of_red_plate", "base", None), ("red_cylinder_right_of_blue_bowl", "base", None),
    ("blue_cylinder_on_red_plate", "base", None), ("white_cube_left_of_green_bowl", "base", None),
    ("purple_cylinder_in_yellow_bowl", "heldout", "entity"), ("orange_sphere_on_blue_plate", "heldout", "entity"),
    ("red_cube_on_blue_plate_dim_wood", "heldout", "environment"),
    ("green_cylinder_in_yellow_bowl_clutter", "heldout", "environment"),
    ("red_cube_in_front_of_blue_plate", "heldout", "spatial"), ("blue_cube_behind_white_bowl", "heldout", "spatial"),
]
V1_SCENE_1234 = {   # task -> (shape, colour, x, y, yaw) per object, goal, light scale, for rng seed 1234
    "red_cube_on_blue_plate": (
        [("cube", "red", 0.4428061817272506, -0.07236117663432098, -1.1401849524271195),
         ("plate", "blue", 0.47124697640470825, 0.16929849350558218, 2.915895894671767),
         ("sphere", "white", 0.371331931538325, -0.13428152750855177, -1.4850320771277503)],
        (0.47124697640470825, 0.16929849350558218), 0.9823018366160534),
    "green_cylinder_in_yellow_bowl_clutter": (
        [("cylinder", "green", 0.4432759530260225, -0.02359755117859544, 1.1541514546610685),
         ("bowl", "yellow", 0.45644814290773433, 0.18563169807135055, 1.0759202058960193),
         ("sphere", "white", 0.6323151847711046, 0.09093828294184142, 0.6975465477494405),
         ("sphere", "green", 0.40796378034598557, -0.17052558397620796, -2.7637387736791568),
         ("cube", "white", 0.6346452403711275, -0.2287278979432122, 3.001912880153383)],
        (0.45644814290773433, 0.18563169807135055), 0.9253801316473913),
    "blue_cube_behind_white_bowl": (
        [("cube", "blue", 0.4428061817272506, -0.07236117663432098, -1.1401849524271195),
         ("bowl", "white", 0.47124697640470825, 0.16929849350558218, 2.915895894671767),
         ("sphere", "white", 0.371331931538325, -0.13428152750855177, -1.4850320771277503)],
        (0.6122469764047083, 0.16929849350558218), 0.9823018366160534),
}


def test_v1_registry_is_unchanged():
    assert [(t.name, t.split, t.factor) for t in TASKS.values()] == V1_TASKS
    assert SUITES["v1"] is TASKS and all(t.suite == "v1" for t in TASKS.values())
    assert [t.name for t in resolve_tasks("base")] == [n for n, s, _ in V1_TASKS if s == "base"]
    assert TASKS["red_cube_on_blue_plate"].instruction == "put the red cube on the blue plate"
    assert all(t.instruction_for(s) == t.instruction for t in TASKS.values() for s in (0, 1, 2))


@pytest.mark.parametrize("name", sorted(V1_SCENE_1234))
def test_v1_scenes_draw_the_same_positions_for_a_seed(name):
    objects, goal, light = V1_SCENE_1234[name]
    scene = TASKS[name].sample_scene(np.random.default_rng(1234), 96)
    assert [(p.entity.shape, p.entity.color, float(p.xy[0]), float(p.xy[1]), p.yaw) for p in scene.spec.objects] \
        == objects
    assert tuple(map(float, scene.goal_xy)) == goal and scene.spec.light_scale == light


# --- the v2 registry -------------------------------------------------------------------------------------------

def test_v2_registry_names_splits_and_factors():
    assert len(V2_BASE) >= 12 and len(V2_HELD) == 6
    assert all(n.startswith("v2-") and n not in TASKS for n in V2_TASKS)
    assert all(t.suite == "v2" for t in V2_TASKS.values())
    for f in V2_FACTORS:
        assert sum(t.factor == f for t in V2_HELD) >= 2, f
    for t in V2_HELD:
        assert V2_TASKS[t.base].split == "base"
    assert resolve_tasks("v2-base") == V2_BASE and resolve_tasks("v2-heldout") == V2_HELD
    assert get_task(V2_BASE[0].name) is V2_BASE[0]
    assert resolve_tasks(f"{V2_BASE[0].name},red_cube_on_blue_plate") == [V2_BASE[0], TASKS["red_cube_on_blue_plate"]]
    with pytest.raises(TaskError, match="v2-red_cube_on_blue_plate"):
        get_task("v2-red_cube_on_blue_plat")
    with pytest.raises(TaskError, match="suite"):
        suite_tasks("v9")
    with pytest.raises(TaskError, match="split"):
        suite_tasks("v2", "train")
    assert suite_tasks("v1", "base") == tasks_by_split("base") and suite_tasks("v2") == list(V2_TASKS.values())
    every = {r for t in V2_BASE for r in [t.relation]}
    assert every == set(RELATIONS)   # every relation is trained


def test_every_entity_of_a_base_scene_is_the_object_or_target_of_some_instruction():
    jobs = {(t.obj, t.relation, t.target) for t in V2_BASE}
    named = {e for j in jobs for e in (j[0], j[2])}
    for t in V2_BASE:
        cast = t.cast
        assert len(cast.candidates) >= 3 and len(cast.receptacles) >= 2
        assert set(cast.entities) <= named, t.name
        # two candidates share a shape (colour tells them apart), two share a colour (shape does)
        shapes = [e.shape for e in cast.candidates]
        colors = [e.color for e in cast.candidates]
        assert len(set(shapes)) < len(shapes) and len(set(colors)) < len(colors), cast.name
        # other tasks on the same scenes: the scene alone does not say what to do
        assert sum(u.cast == cast for u in V2_BASE) >= 3


def test_composition_variants_pair_parts_that_training_saw_only_apart():
    objs = [t.obj for t in V2_BASE]
    shown = {e for t in V2_BASE for e in t.cast.entities}
    kinds = set()
    for t in (t for t in V2_HELD if t.factor == "composition"):
        if all((o.color, o.shape) != (t.obj.color, t.obj.shape) for o in objs):   # attribute-object pair
            kinds.add("attribute")
            assert t.obj not in shown   # not even standing in a training scene
            assert any(o.color == t.obj.color for o in objs) and any(o.shape == t.obj.shape for o in objs)
        else:                                                                       # relation-object pair
            kinds.add("relation")
            assert all((u.relation, u.obj.shape) != (t.relation, t.obj.shape) for u in V2_BASE)
            assert any(u.relation == t.relation for u in V2_BASE) and any(o.shape == t.obj.shape for o in objs)
        assert t.instruction not in {i for u in V2_BASE for i in u.instructions}
    assert kinds == {"attribute", "relation"}
    for t in V2_BASE:   # the held-out object is never drawn into a training scene
        for seed in range(3):
            placed = {p.entity for p in t.sample_scene(np.random.default_rng(seed)).spec.objects}
            assert placed <= shown


def test_environment_variants_change_only_the_world_and_cover_every_environment_factor():
    envs = [t for t in V2_HELD if t.factor == "environment"]
    changed = set()
    for t in envs:
        b = V2_TASKS[t.base]
        assert (t.obj, t.relation, t.target, t.templates, t.cast) == (b.obj, b.relation, b.target, b.templates, b.cast)
        assert t.env not in {u.env for u in V2_BASE}
        changed |= {f for f in ("lighting", "table", "distractors", "camera_jitter")
                    if getattr(t.env, f) != getattr(b.env, f)}
    assert changed == {"lighting", "table", "distractors", "camera_jitter"}


def test_wording_variants_use_templates_no_training_demo_uses():
    assert not set(HELDOUT_TEMPLATES) & set(TRAIN_TEMPLATES)
    trained = {i for t in V2_BASE for i in t.instructions}
    used = set()
    for t in (t for t in V2_HELD if t.factor == "wording"):
        b = V2_TASKS[t.base]
        assert (t.obj, t.relation, t.target, t.env) == (b.obj, b.relation, b.target, b.env)
        assert set(t.templates) <= set(HELDOUT_TEMPLATES) and not set(t.instructions) & trained
        used |= set(t.templates)
        assert all(t.instruction_for(s) in t.instructions for s in range(5))
    assert len(used) >= 2


def test_each_episode_is_worded_by_one_of_the_task_templates_reproducibly():
    t = V2_TASKS["v2-red_cube_on_blue_plate"]
    words = [t.instruction_for(s) for s in range(60)]
    assert words == [t.instruction_for(s) for s in range(60)]
    assert set(words) == set(t.instructions) and len(t.instructions) == len(TRAIN_TEMPLATES) >= 3
    assert all(w == t.instructions[t.template_index(s)] for s, w in enumerate(words))


# --- scenes ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(V2_TASKS))
def test_v2_scenes_are_seeded_spaced_and_keep_every_goal_of_the_cast_clear(name):
    task = V2_TASKS[name]
    a = task.sample_scene(np.random.default_rng(3))
    assert a == task.sample_scene(np.random.default_rng(3)) and a != task.sample_scene(np.random.default_rng(4))
    objs = a.spec.objects
    assert objs[0].entity == task.obj and objs[1].entity == task.target   # what the expert reads
    assert len(objs) == len(task.cast.entities) + task.env.distractors
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            assert np.linalg.norm(np.subtract(objs[i].xy, objs[j].xy)) > objs[i].entity.radius + objs[j].entity.radius
    at = {p.entity: np.array(p.xy) for p in objs}
    for o, rel, tgt in task.cast.jobs:   # any job of the cast can be done on this scene
        goal = at[tgt] + V2Task(name, o, rel, tgt).goal_offset()
        assert REACH[0][0] <= goal[0] <= REACH[0][1] and REACH[1][0] <= goal[1] <= REACH[1][1]
        if rel not in ("on", "in"):
            assert all(np.linalg.norm(goal - xy) > o.radius + e.radius for e, xy in at.items() if e != tgt)
    assert np.allclose(a.goal_xy, at[task.target] + task.goal_offset())


def test_the_tasks_of_a_cast_draw_the_same_scene_from_the_same_seed():
    cast = V2_BASE[0].cast
    scenes = [t.sample_scene(np.random.default_rng(9)).spec for t in V2_BASE if t.cast == cast]
    assert len(scenes) >= 3
    as_set = [sorted((p.entity.name, p.xy, p.yaw) for p in s.objects) for s in scenes]
    assert all(s == as_set[0] for s in as_set)
    assert len({s.objects[0].entity for s in scenes}) == len(scenes)   # but each lists its own object first


# --- success predicates and the instructed task -----------------------------------------------------------------

def _place(world: World, i: int, xyz) -> None:
    adr = world.model.jnt_qposadr[world.model.body_jntadr[world.obj_body[i]]]
    world.data.qpos[adr:adr + 3] = xyz
    world.data.qvel[:] = 0


def _settle(world: World, steps: int = 300) -> None:
    for _ in range(steps):
        world.step(world.arm_bias(), np.zeros(2))


@pytest.mark.parametrize("relation", sorted(RELATIONS))
def test_every_relation_has_a_success_predicate_read_from_the_sim(relation):
    """Each relation, on a scene whose object is listed third (as when another task's scene is checked)."""
    cube, plate, bowl = Entity("cube", "red"), Entity("plate", "blue"), Entity("bowl", "white")
    target = bowl if relation == "in" else plate
    task = V2Task("t", cube, relation, target)
    spec = SceneSpec((Placement(Entity("sphere", "yellow"), (0.40, -0.25)), Placement(target, (0.5, 0.05)),
                      Placement(cube, (0.60, -0.20))), env=EnvSpec(distractors=0))
    for where, expect in ((task.goal_offset(), True), (np.array([0.0, 0.0]) if relation not in ("on", "in")
                                                       else np.array([0.0, 0.16]), False)):
        world = World(spec)
        t = world.object_pos(1)
        z = t[2] + 0.05 if relation in ("on", "in") else cube.half_height + 0.002
        if not expect and relation not in ("on", "in"):   # the wrong side: mirrored
            where = -task.goal_offset()
        _place(world, 2, (t[0] + where[0], t[1] + where[1], z))
        _settle(world)
        assert task.success(world) is expect, (relation, expect)


def test_instructed_task_maps_every_wording_back_to_its_task():
    for t in V2_TASKS.values():
        scene = t.sample_scene(np.random.default_rng(1))
        for text in t.instructions:
            got = instructed_task(scene, text)
            assert got is (V2_TASKS[t.base] if t.factor == "wording" else t), (t.name, text)


def test_another_candidates_instruction_means_another_task_checked_on_the_same_world():
    a = V2_TASKS["v2-red_cube_on_blue_plate"]
    scene = a.sample_scene(np.random.default_rng(5))
    others = [t for t in V2_BASE if t.cast == a.cast and t is not a]
    for b in others:
        text = b.instructions[2]   # any wording, e.g. "pick up the ... and put it ..."
        assert instructed_task(scene, text) is b
    b = next(t for t in others if t.relation in ("on", "in"))
    world = World(scene.spec)
    i, j = [p.entity for p in scene.spec.objects].index(b.obj), 1 if b.target == a.target else \
        [p.entity for p in scene.spec.objects].index(b.target)
    t = world.object_pos(j)
    _place(world, i, (t[0], t[1], t[2] + 0.05))
    _settle(world)
    assert b.success(world) and not a.success(world)


def test_instructed_task_is_none_when_the_instruction_does_not_fit_the_scene():
    a = V2_TASKS["v2-red_cube_on_blue_plate"]
    scene = a.sample_scene(np.random.default_rng(5))
    for text in ("put the purple cube on the blue plate",          # not in the scene
                 "put the red cube near the blue plate",           # no relation
                 "put the red cube on the blue plate behind the white bowl",   # two relations, two targets
                 "put the red cube in the blue plate",             # a plate takes no 'in'
                 "put the red cube on the green cube"):            # no receptacle
        assert instructed_task(scene, text) is None, text
    made = instructed_task(scene, "Put the green cube behind the blue plate!")   # no registry task, still checkable
    assert made is not None and (made.obj, made.relation, made.target) == (Entity("cube", "green"), "behind", a.target)
    assert made.split == "instructed" and made.env == scene.spec.env


def test_instructed_task_on_a_v1_scene():
    t = TASKS["red_cube_on_blue_plate"]
    scene = t.sample_scene(np.random.default_rng(1234))   # its distractor is a white sphere
    assert instructed_task(scene, "place the red cube onto the blue plate") is t
    made = instructed_task(scene, "put the white sphere to the right of the blue plate")
    assert made is not None and made.obj == Entity("sphere", "white") and made.relation == "right_of"


# --- the expert, demos and evaluation ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", [t.name for t in V2_BASE])
def test_expert_solves_every_v2_base_task(name):
    from edge_steer.sim.demos import episode_seed

    # the first two of the scenes docs/model.md measures the expert's rate on (10 a task)
    for seed in (episode_seed(100, i, name) for i in (0, 1)):
        with SimEnv(V2_TASKS[name], seed) as env:
            assert run_expert_episode(env), f"{name} seed {seed}"


def test_demos_record_their_wording_and_a_resumed_run_records_only_what_is_missing(tmp_path):
    from edge_steer.data import Dataset
    from edge_steer.sim.demos import generate_demos, record_episode, recorded_seeds

    # three-step episodes, kept although unfinished: what is checked is the bookkeeping, not the expert
    name, small = "v2-blue_sphere_on_yellow_plate", EnvConfig(image_size=32, max_steps=3)
    out = tmp_path / "d"
    record = dict(workers=1, keep_failed=True, resume=True)
    first = generate_demos(name, 1, 3, out, small, **record)
    assert first["saved"] == 1 and first["already"] == 0
    again = generate_demos(name, 2, 3, out, small, **record)
    assert again["saved"] == 1 and again["already"] == 1
    assert generate_demos(name, 2, 3, out, small, **record)["saved"] == 0
    other_run = generate_demos(name, 1, 4, out, small, **record)   # another seed's run in the same dataset
    assert other_run["saved"] == 1 and other_run["already"] == 0
    ds = Dataset(out)
    task = V2_TASKS[name]
    assert ds.num_episodes == 3 and len(recorded_seeds(out, name)) == 3 and not recorded_seeds(out, "other")
    for ep in ds.episodes:
        seed = ep.extra["seed"]
        assert ep.task == task.instruction_for(seed) and ep.extra["template"] == task.template_index(seed)
    v1 = record_episode("red_cube_on_blue_plate", 0, EnvConfig(image_size=32, max_steps=1))
    assert "template" not in v1.extra and v1.instruction == TASKS["red_cube_on_blue_plate"].instruction


def test_cli_names_v2_tasks_by_suite_and_split():
    import json

    from typer.testing import CliRunner

    from edge_steer.cli import app

    r = CliRunner().invoke(app, ["tasks", "list", "--suite", "v2", "--split", "heldout", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [x["name"] for x in rows] == [t.name for t in V2_HELD] and {x["suite"] for x in rows} == {"v2"}
    r = CliRunner().invoke(app, ["tasks", "list", "--suite", "v3"])
    assert r.exit_code == 2 and "unknown suite" in r.output
    r = CliRunner().invoke(app, ["demos", "generate", "--task", "v2-red_cube_on_blue_plat", "--out", "/nonexistent/x"])
    assert r.exit_code == 2 and "v2-red_cube_on_blue_plate" in r.output
    assert all(e.shape in GRASPABLE for e in (t.obj for t in V2_BASE))
    assert all(e.shape in RECEPTACLES for e in (t.target for t in V2_BASE))
