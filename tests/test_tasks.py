"""Task registry, variations, scene sampling and success predicates."""

import numpy as np
import pytest

from edge_steer.sim.scene import Entity, EnvSpec
from edge_steer.sim.tasks import FACTORS, OBJ_REGION, TASKS, Task, TaskError, get_task, tasks_by_split
from edge_steer.sim.world import World


def test_registry_has_base_tasks_and_two_heldout_variants_per_factor():
    assert len(tasks_by_split("base")) >= 6
    held = tasks_by_split("heldout")
    assert len(held) >= 6
    for f in FACTORS:
        assert sum(t.factor == f for t in held) >= 2, f
    for t in held:
        assert t.base in TASKS and TASKS[t.base].split == "base"
    assert len({t.instruction for t in tasks_by_split("base")}) == len(tasks_by_split("base"))


def test_heldout_variants_really_change_their_factor():
    base = tasks_by_split("base")
    base_colors = {t.obj.color for t in base} | {t.target.color for t in base}
    base_shapes = {t.obj.shape for t in base}
    base_relations = {t.relation for t in base}
    base_envs = {t.env for t in base}
    for t in tasks_by_split("heldout"):
        if t.factor == "entity":
            assert t.obj.color not in base_colors or t.obj.shape not in base_shapes
        elif t.factor == "spatial":
            assert t.relation not in base_relations
        else:
            assert t.env not in base_envs and t.instruction == TASKS[t.base].instruction


def test_unknown_task_suggests_close_names():
    with pytest.raises(TaskError, match="red_cube_on_blue_plate"):
        get_task("red_cube_on_blue_plat")
    with pytest.raises(TaskError, match="tasks list"):
        get_task("zzz")


@pytest.mark.parametrize("bad", [
    dict(lighting="disco"), dict(table="glass"), dict(distractors=9), dict(camera_jitter=0.5), dict(spawn_margin=0.2),
    dict(object_color="mauve"), dict(object_shape="plate"), dict(object_size=3.0), dict(colour="red"),
])
def test_impossible_variations_are_refused(bad):
    with pytest.raises(ValueError):
        get_task("red_cube_on_blue_plate").vary(**bad)


def test_invalid_task_definitions_are_refused():
    with pytest.raises(TaskError):
        Task("x", Entity("bowl", "red"), "on", Entity("plate", "blue"))  # a bowl cannot be picked
    with pytest.raises(TaskError):
        Task("x", Entity("cube", "red"), "in", Entity("plate", "blue"))  # 'in' needs a bowl
    with pytest.raises(TaskError):
        Task("x", Entity("cube", "red"), "under", Entity("plate", "blue"))


def test_vary_changes_exactly_what_was_asked():
    t = get_task("red_cube_on_blue_plate").vary(lighting="dim", distractors=3, object_color="purple")
    assert t.env == EnvSpec(lighting="dim", table="grey", distractors=3, camera_jitter=0.0)
    assert t.obj == Entity("cube", "purple") and t.target == Entity("plate", "blue")
    assert t.instruction == "put the purple cube on the blue plate"


def test_spawn_margin_widens_where_objects_start_and_nothing_else():
    """The 'object position ranges widened' perturbation: objects start up to the margin beyond the demos'
    region; at margin 0 a seed draws exactly the scenes it always drew."""
    task = get_task("red_cube_on_blue_plate")
    wide = task.vary(spawn_margin=0.05)

    def starts(t, n=200):
        rng = np.random.default_rng(7)
        return np.array([[p.xy for p in t.sample_scene(rng).spec.objects[:2]] for _ in range(n)]).reshape(-1, 2)
    base, far = starts(task), starts(wide)
    assert np.array_equal(base, starts(task.vary(spawn_margin=0.0)))
    inside = lambda xy, m: ((OBJ_REGION[0][0] - m <= xy[:, 0]) & (xy[:, 0] <= OBJ_REGION[0][1] + m)   # noqa: E731
                            & (OBJ_REGION[1][0] - m <= xy[:, 1]) & (xy[:, 1] <= OBJ_REGION[1][1] + m))
    assert inside(base, 0.0).all() and inside(far, 0.05).all()
    assert (~inside(far, 0.0)).mean() > 0.1   # about a third of the widened area lies outside the old one
    assert wide.env.spawn_margin == 0.05 and wide.obj == task.obj and wide.instruction == task.instruction


@pytest.mark.parametrize("name", list(TASKS))
def test_scene_sampling_is_seeded_and_keeps_objects_apart(name):
    task = TASKS[name]
    a = task.sample_scene(np.random.default_rng(3))
    b = task.sample_scene(np.random.default_rng(3))
    c = task.sample_scene(np.random.default_rng(4))
    assert a == b and a != c
    objs = a.spec.objects
    assert len(objs) == 2 + task.env.distractors
    assert objs[0].entity == task.obj and objs[1].entity == task.target
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            d = np.linalg.norm(np.subtract(objs[i].xy, objs[j].xy))
            assert d > objs[i].entity.radius + objs[j].entity.radius


def _settle(world: World, steps: int = 400) -> None:
    for _ in range(steps):
        world.step(world.arm_bias(), np.zeros(2))


def _teleport(world: World, i: int, xyz) -> None:
    adr = world.model.jnt_qposadr[world.model.body_jntadr[world.obj_body[i]]]
    world.data.qpos[adr:adr + 3] = xyz
    world.data.qvel[:] = 0


@pytest.mark.parametrize("name,offset,expect", [
    ("green_cylinder_in_yellow_bowl", (0.0, 0.0), True),
    ("green_cylinder_in_yellow_bowl", (0.0, 0.15), False),
    ("red_cube_on_blue_plate", (0.02, -0.02), True),
    ("red_cube_on_blue_plate", (0.12, 0.0), False),
    ("yellow_cube_left_of_red_plate", (0.0, 0.13), True),
    ("yellow_cube_left_of_red_plate", (0.0, -0.13), False),
    ("red_cube_in_front_of_blue_plate", (-0.13, 0.0), True),
    ("red_cube_in_front_of_blue_plate", (0.13, 0.0), False),
    ("blue_cube_behind_white_bowl", (0.14, 0.0), True),
    ("blue_cube_behind_white_bowl", (0.14, 0.12), False),
])
def test_success_predicate_reads_the_sim_state(name, offset, expect):
    task = TASKS[name].vary(distractors=0)
    scene = task.sample_scene(np.random.default_rng(0))
    world = World(scene.spec)
    target = world.object_pos(1)
    z = target[2] + 0.05 if task.relation in ("on", "in") else task.obj.half_height + 0.002
    _teleport(world, 0, (target[0] + offset[0], target[1] + offset[1], z))
    _settle(world)
    assert task.success(world) is expect


def test_success_needs_the_object_at_rest():
    task = TASKS["red_cube_on_blue_plate"].vary(distractors=0)
    world = World(task.sample_scene(np.random.default_rng(0)).spec)
    t = world.object_pos(1)
    _teleport(world, 0, (t[0], t[1], t[2] + 0.3))  # dropped from 30 cm: still falling
    _settle(world, 50)
    assert not task.success(world)
