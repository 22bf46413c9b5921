"""Success of an evaluation sliced by one scene variable, to find what a task's failures share.

Each episode of an `edge-steer eval --out LOG` names its task and scene seed, and the scene is a pure function
of the two, so the layout is re-drawn here without the sim. Slicing the white cube's failures by the cube's yaw off
square is what found attempt 16's cause (docs/model.md): 17/37 at 36-45 degrees against ~80 % elsewhere.

    .venv/bin/python tools/slice_eval.py runs/eval.json [more logs] --by yaw|distractor|reach [--per-task]

  yaw         the object's yaw off square to its nearest face, 9-degree bins (cubes only: round things have no face)
  distractor  what else stands on the table
  reach       object-to-goal distance, quartile bins over the episodes given
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from edge_steer.sim.env import EnvConfig
from edge_steer.sim.expert import face_yaw
from edge_steer.sim.tasks import get_task

VARIABLES = ("yaw", "distractor", "reach")


def scene_variables(task_name: str, seed: int) -> dict:
    """The variables one episode's scene was drawn with (the same draw SimEnv makes)."""
    task = get_task(task_name)
    scene = task.sample_scene(np.random.default_rng(seed), EnvConfig().image_size)
    obj = scene.spec.objects[0]
    return {"yaw": float(np.degrees(abs(face_yaw(obj.yaw)))) if obj.entity.shape == "cube" else None,
            "distractor": ", ".join(p.entity.name for p in scene.spec.objects[2:]) or "none",
            "reach": float(np.linalg.norm(np.subtract(obj.xy, scene.goal_xy)))}


def bin_labels(variable: str, values: list) -> list[str | None]:
    """A label per episode (None: the variable does not apply to it)."""
    if variable == "distractor":
        return list(values)
    if variable == "yaw":
        return [None if v is None else f"{9 * min(int(v // 9), 4):2d}-{9 * min(int(v // 9), 4) + 9}°" for v in values]
    edges = np.quantile([v for v in values if v is not None], [0.25, 0.5, 0.75])
    names = [f"q1 <{edges[0]:.2f} m", f"q2 {edges[0]:.2f}-{edges[1]:.2f} m", f"q3 {edges[1]:.2f}-{edges[2]:.2f} m",
             f"q4 >{edges[2]:.2f} m"]   # quartiles, named so they sort in order
    return [names[int(np.searchsorted(edges, v, side="right"))] for v in values]


def slice_episodes(episodes: list[dict], variable: str, per_task: bool = False) -> dict[tuple[str, str], list[int]]:
    """{(task or 'all', bin): [successes, episodes]}; episodes the variable does not apply to are left out."""
    if variable not in VARIABLES:
        raise SystemExit(f"--by {variable!r}: choose from {', '.join(VARIABLES)}")
    values = [scene_variables(e["task"], e["seed"])[variable] for e in episodes]
    table: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for e, label in zip(episodes, bin_labels(variable, values)):
        if label is not None:
            cell = table[(e["task"] if per_task else "all", label)]
            cell[0] += bool(e["success"])
            cell[1] += 1
    return dict(table)


def markdown(table: dict[tuple[str, str], list[int]], variable: str) -> str:
    lines = [f"| task | {variable} | success |", "|---|---|---|"]
    for (task, label), (k, n) in sorted(table.items()):
        lines.append(f"| {task} | {label} | {k}/{n} ({100 * k / n:.0f} %) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", type=Path, help="per-episode logs of edge-steer eval --out")
    ap.add_argument("--by", default="yaw", help=f"one of {', '.join(VARIABLES)}")
    ap.add_argument("--per-task", action="store_true", help="a row per task and bin instead of pooling tasks")
    args = ap.parse_args(argv)
    episodes = []
    for log in args.logs:
        try:
            episodes += json.loads(log.read_text())["episodes"]
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"{log}: not an edge-steer eval log ({e})") from None
    table = slice_episodes(episodes, args.by, args.per_task)
    if not table:
        raise SystemExit(f"--by {args.by}: applies to none of the {len(episodes)} episodes (yaw needs a cube)")
    print(markdown(table, args.by))


if __name__ == "__main__":
    main(sys.argv[1:])
