"""Sim benchmarks on this machine: physics steps/s, render frames/s, demo episodes/min.

Usage: .venv/bin/python tools/bench_sim.py [--out docs/benchmarks.md]
Writes a markdown section with the command, the machine and the measured figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from _report import git_commit, this_machine, upsert_section

from edge_steer.sim.camera import SceneRenderer
from edge_steer.sim.demos import generate_demos
from edge_steer.sim.env import EnvConfig, SimEnv
from edge_steer.sim.panda import CartesianImpedance, SimPanda
from edge_steer.sim.tasks import get_task
from edge_steer.sim.world import World

TASK = "green_cylinder_in_yellow_bowl_clutter"  # the busiest scene: 5 objects


def bench_physics(seconds: float = 3.0) -> dict:
    env = SimEnv(get_task(TASK), 0)
    w = env.world
    tau, f = np.zeros(7), np.zeros(2)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(1000):
            w.step(w.arm_bias() + tau, f)
        n += 1000
    raw = n / (time.perf_counter() - t0)
    env.close()
    # with the Cartesian impedance law evaluated every tick, as SimPanda does
    p = SimPanda(World(env.scene.spec), realtime=False)
    c = CartesianImpedance()
    p.start_controller(c)
    c.set_control(p.get_position() + [0.05, 0, 0], p.get_orientation())
    t0 = time.perf_counter()
    p.step_until(p.world.time + seconds)
    ctl = seconds * 1000 / (time.perf_counter() - t0)
    return {"raw": raw, "controlled": ctl}


def bench_render(size: int, frames: int = 100) -> dict:
    env = SimEnv(get_task(TASK), 0)
    r = SceneRenderer(env.world, size, size)
    out = {}
    for cam in ("front", "wrist"):
        r.rgb(cam)
        t0 = time.perf_counter()
        for _ in range(frames):
            r.rgb(cam)
        out[cam] = frames / (time.perf_counter() - t0)
    r.close()
    env.close()
    return out


def bench_demos(episodes: int, workers: int) -> float:
    d = tempfile.mkdtemp()
    try:
        t0 = time.perf_counter()
        generate_demos("red_cube_on_blue_plate", episodes, 0, os.path.join(d, "ds"), EnvConfig(), workers=workers)
        return 60 * episodes / (time.perf_counter() - t0)
    finally:
        shutil.rmtree(d)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--episodes", type=int, default=8)
    args = ap.parse_args()
    phys = bench_physics()
    rend = bench_render(128)
    rend96 = bench_render(96)
    epm1 = bench_demos(args.episodes, 1)
    epm2 = bench_demos(args.episodes, 2)
    commit = git_commit()
    lines = [
        "## Simulation (issue 2)",
        "",
        f"Command: `.venv/bin/python tools/bench_sim.py --episodes {args.episodes}` at commit `{commit}`, "
        f"{this_machine()}, MUJOCO_GL={os.environ.get('MUJOCO_GL')}.",
        f"Scene: `{TASK}` (arm + 5 objects), timestep 1 ms.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| physics, bare `mj_step` (steps/s) | {phys['raw']:,.0f} |",
        f"| physics + Cartesian impedance law per tick (steps/s = x real time / 1000) | {phys['controlled']:,.0f} ({phys['controlled'] / 1000:.1f}x real time) |",
        f"| render 128x128 front camera (frames/s) | {rend['front']:.1f} |",
        f"| render 128x128 wrist camera (frames/s) | {rend['wrist']:.1f} |",
        f"| render 96x96 front / wrist (frames/s) | {rend96['front']:.1f} / {rend96['wrist']:.1f} |",
        f"| expert demos, 2 cameras at 96 px, 10 Hz, 1 worker (episodes/min) | {epm1:.1f} |",
        f"| expert demos, 2 workers (episodes/min) | {epm2:.1f} ({epm2 / epm1:.2f}x 1 worker) |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    upsert_section(args.out, text)


if __name__ == "__main__":
    main()
