"""What running the benchmark's units on Ray costs against the local pool, on this machine.

1. Per-task overhead: `--tasks` empty units (a Ray task that returns at once, a local call that returns at
   once), wall seconds each, after a warm-up; plus one real evaluation unit of `--episodes` episodes of the
   default model through each executor, the difference being what Ray adds to a unit of real work (shipping
   the checkpoint, a worker's imports).
2. Scaling: the same `--episodes`-episode evaluation on 1 and then 2 workers: the local pool (`evaluate`
   with workers=1, 2) and an embedded Ray of 1, 2 CPUs (`ray_evaluate`, batches of `--batch`).

Writes a JSON (machine description in the header, as the other benchmarks) and prints a table. Smoke:
    python tools/bench_cluster.py --tasks 4 --episodes 2 --batch 1 --out /tmp/bench_cluster.json
Timed run (a quiet machine; about 3 minutes on 2 cores; results in docs/cluster.md):
    python tools/bench_cluster.py --tasks 200 --episodes 8 --batch 4 --out docs/results/bench_cluster_2core.json
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path


def _nothing(x: int) -> int:
    return x


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=200, help="empty tasks for the per-task overhead")
    ap.add_argument("--episodes", type=int, default=16, help="evaluation episodes for the real unit and the scaling")
    ap.add_argument("--batch", type=int, default=4, help="episodes per Ray task")
    ap.add_argument("--task", default="purple_cylinder_in_yellow_bowl")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import ray

    from edge_steer.bench.docs import this_machine
    from edge_steer.bench.executors import RayExecutor, ray_evaluate
    from edge_steer.models import DEFAULT_MODEL_DIR, EdgeVLA
    from edge_steer.sim.rollout import evaluate
    from edge_steer.sim.tasks import get_task

    tasks = [get_task(args.task)]
    load = partial(EdgeVLA.from_pretrained, DEFAULT_MODEL_DIR)
    out: dict = {"machine": this_machine(), "ray": ray.__version__, "tasks": args.tasks, "episodes": args.episodes,
                 "batch": args.batch, "task": args.task}

    local_call = _timed(lambda: [_nothing(i) for i in range(args.tasks)]) / args.tasks
    local_eval = {w: _timed(lambda w=w: evaluate(load, tasks, args.episodes, 0, workers=w)) for w in (1, 2)}
    ray_eval, ray_task = {}, None
    for cpus in (1, 2):
        ex = RayExecutor(num_cpus=cpus, episode_batch=args.batch)
        if ray_task is None:
            remote = ray.remote(num_cpus=1)(_nothing)
            ray.get([remote.remote(i) for i in range(cpus * 4)])          # workers started and warm
            ray_task = _timed(lambda: ray.get([remote.remote(i) for i in range(args.tasks)])) / args.tasks
        ray_eval[cpus] = _timed(lambda ex=ex: ray_evaluate(ex, DEFAULT_MODEL_DIR, tasks, args.episodes, 0))
        ex.shutdown()
    out.update({"per_task_s": {"local": local_call, "ray": ray_task},
                "eval_s": {"local": local_eval, "ray": ray_eval},
                "per_episode_s": {"local": {w: s / args.episodes for w, s in local_eval.items()},
                                  "ray": {w: s / args.episodes for w, s in ray_eval.items()}}})
    print(f"machine: {out['machine']}; ray {out['ray']}")
    print(f"per-task overhead, empty task: local call {1e6 * local_call:.1f} µs, Ray task {1e3 * ray_task:.2f} ms")
    print(f"{args.episodes} episodes of {args.task}:   1 worker   2 workers")
    for name, d in (("local pool", local_eval), (f"Ray (batches of {args.batch})", ray_eval)):
        print(f"  {name:24s} {d[1]:7.1f} s  {d[2]:7.1f} s  ({d[1] / d[2]:.2f}x)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
