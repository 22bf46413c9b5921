"""tools/slice_eval.py: an evaluation's success sliced by a scene variable, re-drawn from (task, seed)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import slice_eval  # noqa: E402

from edge_steer.sim.env import SimEnv  # noqa: E402


def test_the_variables_are_those_of_the_scene_the_sim_builds():
    with SimEnv(slice_eval.get_task("white_cube_left_of_green_bowl"), 12345) as env:
        objects = env.scene.spec.objects
        yaw = np.arctan2(*env.world.object_mat(0)[[1, 0], 0])     # as the cube stands in the sim
        goal = env.scene.goal_xy
    v = slice_eval.scene_variables("white_cube_left_of_green_bowl", 12345)
    assert v["yaw"] == pytest.approx(np.degrees(abs((yaw + np.pi / 4) % (np.pi / 2) - np.pi / 4)), abs=0.01)
    assert v["distractor"] == ", ".join(p.entity.name for p in objects[2:])
    assert v["reach"] == pytest.approx(np.linalg.norm(np.subtract(objects[0].xy, goal)))
    assert slice_eval.scene_variables("red_cylinder_right_of_blue_bowl", 1)["yaw"] is None   # no faces


def test_episodes_are_counted_once_in_their_bin_and_round_objects_left_out_of_yaw(tmp_path, capsys):
    cube = [{"task": "red_cube_on_blue_plate", "seed": s, "success": s % 2 == 0} for s in range(20)]
    cylinder = [{"task": "blue_cylinder_on_red_plate", "seed": s, "success": True} for s in range(5)]
    table = slice_eval.slice_episodes(cube + cylinder, "yaw")
    assert sum(n for _, n in table.values()) == 20 and sum(k for k, _ in table.values()) == 10
    for (_, label), (k, n) in table.items():   # each bin holds exactly the episodes whose yaw falls in it
        lo = int(label.split("-")[0])
        members = [e for e in cube if lo <= min(slice_eval.scene_variables(e["task"], e["seed"])["yaw"], 44.999) < lo + 9]
        assert (k, n) == (sum(e["success"] for e in members), len(members))
    reach = slice_eval.slice_episodes(cube + cylinder, "reach", per_task=True)
    assert {t for t, _ in reach} == {"red_cube_on_blue_plate", "blue_cylinder_on_red_plate"}
    assert sum(n for _, n in reach.values()) == 25
    log = tmp_path / "eval.json"
    log.write_text(json.dumps({"summary": [], "episodes": cylinder}))
    with pytest.raises(SystemExit, match="applies to none of the 5 episodes"):
        slice_eval.main([str(log), "--by", "yaw"])
    with pytest.raises(SystemExit, match="choose from yaw, distractor, reach"):
        slice_eval.main([str(log), "--by", "colour"])
    with pytest.raises(SystemExit, match="not an edge-steer eval log"):
        slice_eval.main([str(tmp_path / "missing.json")])
    slice_eval.main([str(log), "--by", "distractor"])
    assert "| all |" in capsys.readouterr().out
