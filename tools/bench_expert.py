"""Scripted-expert success rate per task over many seeds (issue 2 asks for >= 95 % on every task).

Usage: .venv/bin/python tools/bench_expert.py --seeds 30 [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import time

from rich.progress import track

from _report import git_commit, upsert_section

from edge_steer.sim.demos import process_pool
from edge_steer.sim.env import SimEnv
from edge_steer.sim.rollout import wilson_interval
from edge_steer.sim.expert import run_expert_episode
from edge_steer.sim.tasks import TASKS, get_task

SEED_OFFSET = 10_000  # away from the seeds the tests use


def _run(args) -> tuple[str, int, bool]:
    name, seed = args
    with SimEnv(get_task(name), seed) as env:
        return name, seed, run_expert_episode(env)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="docs/benchmarks.md")
    args = ap.parse_args()
    jobs = [(n, SEED_OFFSET + s) for n in TASKS for s in range(args.seeds)]
    t0 = time.perf_counter()
    results: dict[str, list[bool]] = {n: [] for n in TASKS}
    failures = []
    with process_pool(args.workers) as pool:
        for name, seed, ok in track(pool.map(_run, jobs), total=len(jobs), description="expert episodes"):
            results[name].append(ok)
            if not ok:
                failures.append(f"{name}:{seed}")
    dt = time.perf_counter() - t0
    commit = git_commit()
    lines = ["## Scripted expert success (issue 2)", "",
             f"Command: `.venv/bin/python tools/bench_expert.py --seeds {args.seeds}` at commit `{commit}` "
             f"({len(jobs)} episodes, {dt / 60:.1f} min with {args.workers} workers). Seeds start at {SEED_OFFSET}.", "",
             "| task | split | factor | success | 95 % CI (Wilson) |", "|---|---|---|---|---|"]
    for name, res in results.items():
        t = TASKS[name]
        lo, hi = wilson_interval(sum(res), len(res))
        lines.append(f"| {name} | {t.split} | {t.factor or '-'} | {sum(res)}/{len(res)} | {lo:.2f}-{hi:.2f} |")
    total = sum(sum(r) for r in results.values())
    lines += ["", f"Overall: {total}/{len(jobs)} ({100 * total / len(jobs):.1f} %). "
              f"Failed seeds: {', '.join(failures) if failures else 'none'}.", ""]
    text = "\n".join(lines)
    print(text)
    upsert_section(args.out, text)


if __name__ == "__main__":
    main()
