"""Benchmark the serve daemon in sim under inference load; prints a JSON summary (docs/serve.md).

    .venv/bin/python tools/bench_serve.py --seconds 60 [--engine model|onnx|expert+load|expert]
                                          [--setups motion:fifo:camera=sim,motion:fifo:camera=replay] [--out FILE]

A setup is `where:scheduler[:option...]`; options: `camera=sim|replay` (the cameras: `sim` renders the
scene in software on the daemon's cores; `replay` delivers frames recorded from the sim beforehand at
30 Hz from a process of their own, as a RealSense delivers from librealsense's threads, so the run
measures what the runtime itself costs), `render=N` (the sim cameras' software renderer
threads, `sim_render_threads`; default 0, the config's; `render=mesa`: Mesa's own choice) and `switch=S` (Python's GIL switch
interval in seconds; default 0.0005, what `edge-steer serve` sets). Every setup runs in a fresh
interpreter, so none inherits another's threads, GL state or warm caches. The setpoint stage's own
cost per tick is also measured alone, in this process before the setups run (`setpoint_tick_alone`).

Engines: `model` runs the embedded default model in torch (its motion is the model's); `onnx` runs the
same model exported to ONNX on onnxruntime, as `edge-steer demo` serves it; `expert+load` runs a
default-size EdgeVLA with random weights for the inference load and latency and takes the motion
from the scripted expert, so the arm does the task while the CPU carries a real model's load;
`expert` has no model load. The arm is re-instructed whenever a task ends, so it moves throughout.
Measured: the sim robot's 1 kHz loop (SimPanda, libfranka's stand-in) and the daemon's setpoint loop
period error and missed ticks, camera-frame -> first-setpoint latency, `status` round trip over
ZMQ (20 Hz), telemetry rate seen by a subscriber. `--setups` runs the whole benchmark once per setup,
side by side, and prints each one's ratios to the first. A setup is `where:scheduler`: where SimPanda's
loop runs (`motion`, the only placement left: its own interpreter, as libfranka's C++ loop is outside the
GIL, with the setpoint stage ticking in its loop; `process` and `thread`, the stage or both loops inside
the daemon, were retired with realtime.motion / robot.sim_loop "thread" after the figures in docs/serve.md), and
how both 1 kHz loops are scheduled (`fifo`, the default: SimPanda's
SCHED_FIFO 20 as libfranka's, the setpoint loop SCHED_FIFO 10; `other`: both SCHED_OTHER).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

from edge_steer.runtime.launch import free_endpoint


class LoadedExpert:
    """The expert's chunk, after a full model forward pass on the same observation (the load)."""

    def __init__(self, expert, model_engine):
        self.expert, self.model = expert, model_engine
        self.backend = "expert+load"

    def predict(self, obs, instruction):
        self.model.predict(obs, instruction)
        return self.expert.predict(obs, instruction)

    def metadata(self):
        return {"backend": self.backend, "model": self.model.metadata()}

    def set_steering(self, delta):
        self.model.set_steering(delta)


LOOPS = ("robot_loop_1khz (SimPanda)", "setpoint_loop_1khz")


def run(args, setup: str) -> dict:
    from edge_steer.client import Client
    from edge_steer.runtime.config import ServeConfig
    from edge_steer.runtime.daemon import Daemon
    from edge_steer.runtime.engine import TorchEngine
    from edge_steer.runtime.expert_engine import ExpertEngine
    from edge_steer.runtime.robot import open_robot

    where, scheduler, opts = _parse_setup(setup)
    cmd, tel = free_endpoint(), free_endpoint()
    # the arm keeps working: a new episode (the expert re-plans from the scene as it is) every 12 s
    fifo = scheduler == "fifo"
    # "motion": the robot's own process, with the setpoint stage ticking in its loop (runtime/motion.py); the
    # other placements ("process": the stage a daemon thread, "thread": both in the daemon) are retired
    # fresh_scene off: each new episode re-plans in the scene as it is, as before sim scenes were reopened per
    # episode (reopening one restarts the cell for seconds: a figure of scene set-up, not of the runtime)
    cfg = ServeConfig.sim().with_(zmq={"command": cmd, "telemetry": tel},
                                  robot={"stop_on_success": False, "fresh_scene": False},
                                  realtime={"priority": 10 if fifo else 0, "required": fifo})
    from dataclasses import replace
    if "render" in opts:
        n = -1 if opts["render"] == "mesa" else int(opts["render"])
        cfg = cfg.with_(cameras=tuple(replace(c, sim_render_threads=n) for c in cfg.cameras))
    if opts.get("camera") == "replay":
        cfg = cfg.with_(cameras=tuple(replace(c, backend="replay", replay_path=args.replay_path) for c in cfg.cameras))
    robot = open_robot(cfg.robot, sim_rt_priority=None if fifo else 0, motion=(cfg.rates, cfg.safety))
    if fifo and robot.arm.rt_refused:
        raise SystemExit(f"the fifo run needs real-time scheduling: {robot.arm.rt_refused}")
    import torch
    torch.set_num_threads(cfg.engine.threads)
    if args.engine == "model":
        engine = TorchEngine.load(None)
    elif args.engine == "onnx":
        from edge_steer.runtime.daemon import build_engine
        engine = build_engine(cfg.with_(engine={"backend": "onnxruntime", "path": args.onnx_path}), robot)
    elif args.engine == "expert+load":
        from edge_steer.models import EdgeVLA, EdgeVLAConfig
        engine = LoadedExpert(ExpertEngine(robot.sim), TorchEngine(EdgeVLA(EdgeVLAConfig())))
    else:
        engine = ExpertEngine(robot.sim)
    d = Daemon(cfg, engine=engine, robot=robot).start()
    c = Client(cmd, tel, timeout_ms=5000)
    stop = threading.Event()
    tele = {"n": 0}

    def subscriber():
        sub = Client(cmd, tel)
        for _ in sub.telemetry(timeout_ms=1000):
            tele["n"] += 1
            if stop.is_set():
                break
        sub.close()

    ts = threading.Thread(target=subscriber, daemon=True)
    ts.start()
    time.sleep(1.0)
    # reset the timing windows so start-up is not measured
    d.reset_loop_timing()
    tele["n"] = 0
    t0 = time.perf_counter()
    rtts, episodes, successes = [], 0, 0
    texts = [robot.sim.task.instruction, robot.sim.task.instruction + " again"]
    last = -1e9
    while time.perf_counter() - t0 < args.seconds:
        a = time.perf_counter()
        s = c.status()
        rtts.append((time.perf_counter() - a) * 1e3)
        if s["state"] == "FAULT":
            print("FAULT:", s["fault"], file=sys.stderr)
            c.recover()
        elif a - last > 12.0:
            successes += bool(episodes and s["sim"]["success"])
            c.instruct(texts[episodes % 2])
            episodes += 1
            last = a
        time.sleep(0.05)
    successes += bool(c.status()["sim"]["success"])
    elapsed = time.perf_counter() - t0
    tele_rate = tele["n"] / elapsed
    stop.set()
    s = c.status()
    c.close()
    d.close()
    rtt = np.array(rtts)
    sp, rl = s["setpoint_loop"], s["robot_loop"]
    return {
        "setup": setup, "camera": cfg.cameras[0].backend,
        # the figures the runtime's goals are stated in (the full records follow)
        "frame_to_first_setpoint_ms": {k: sp.get(f"latency_ms_{k}") for k in ("p50", "p99")},
        "inference_ms_p50_p99": [s["inference_ms"].get("p50"), s["inference_ms"].get("p99")],
        "robot_loop_period_err_us_p99": rl.get("period_err_us_p99"),
        "robot_loop_missed_ticks_per_min": round(60 * rl.get("missed_ticks", 0) / elapsed, 1),
        "setpoint_loop_missed_ticks_per_min": round(60 * sp.get("missed_ticks", 0) / elapsed, 1),
        "switch_interval_s": sys.getswitchinterval(),
        "render_threads": cfg.cameras[0].sim_render_threads, "engine": args.engine, "seconds": round(elapsed, 1), "cpus": os.cpu_count(),
        "load_avg_1min_at_end": os.getloadavg()[0],
        "robot_loop_1khz (SimPanda)": s["robot_loop"], "setpoint_loop_1khz": s["setpoint_loop"],
        "frame_to_policy_ms": s["frame_to_policy_ms"], "inference_ms": s["inference_ms"], "chunks": s["chunks"], "chunks_dropped": s["chunks_dropped"],
        "zmq_status_rtt_ms": {"p50": float(np.percentile(rtt, 50)), "p99": float(np.percentile(rtt, 99)),
                              "max": float(rtt.max()), "n": int(rtt.size)},
        "telemetry_hz": round(tele_rate, 1), "episodes_started": episodes, "episodes_ending_in_success": successes,
    }


def _parse_setup(setup: str) -> tuple[str, str, dict[str, str]]:
    where, _, rest = setup.partition(":")
    sched, *options = rest.split(":")
    opts = dict(o.split("=", 1) for o in options if "=" in o)
    if where in ("process", "thread"):
        raise SystemExit(f"setup {setup!r}: the {where!r} placement is retired (realtime.motion / robot.sim_loop "
                         "'thread', docs/serve.md); use motion:fifo or motion:other")
    if where != "motion" or sched not in ("fifo", "other") or set(opts) - {"render", "switch", "camera"} \
            or opts.get("camera", "sim") not in ("sim", "replay") or len(opts) != len(options):
        raise SystemExit(f"bad setup {setup!r}: where:scheduler[:camera=sim|replay][:render=N][:switch=S], where is "
                         "motion, scheduler in fifo|other")
    return where, sched, opts


def _run_here(args) -> None:
    import logging
    logging.basicConfig(level="WARNING", stream=sys.stderr)
    opts = _parse_setup(args.one)[2]
    sys.setswitchinterval(float(opts.get("switch", 0.0005)))   # 0.0005: as `edge-steer serve` does
    print(json.dumps(run(args, args.one)))


def setpoint_tick_alone(ticks: int = 20_000) -> dict:
    """The setpoint stage's own cost per tick with nothing else running: `tick()` called back to back in
    this process, a fresh chunk handed over mid-segment every segment as the policy stage does at 10 Hz,
    each tick timed alone (so the 1 kHz loop's sleeping and scheduling are not in it)."""
    from edge_steer.runtime.config import RatesConfig, SafetyConfig
    from edge_steer.runtime.safety import SafetyFilter
    from edge_steer.runtime.setpoint import Chunk, SetpointStage

    class Controller:   # the robot side's setter, free: only the stage's own work is timed
        def set_control(self, position, orientation, q_nullspace):
            pass

    rates = RatesConfig()
    stage = SetpointStage(rates, SafetyFilter(SafetyConfig(), 1.0 / rates.control_hz), lambda close: None)
    stage.controller = Controller()
    stage.reset([0.45, 0.0, 0.30], (1.0, 0.0, 0.0, 0.0))   # gripper down, mid-workspace
    stage.hold_reason = None
    rng = np.random.default_rng(0)
    per_seg, cost = stage.ticks_per_seg, np.empty(ticks)
    for i in range(ticks):
        if i % per_seg == per_seg // 2:
            actions = np.zeros((10, 7))
            actions[:, :3] = rng.normal(0.0, 0.002, (10, 3))   # mm-scale steps, as the policy makes
            stage.inbox = Chunk(actions, stage.segment, time.time(), seq=i)
        t = time.perf_counter_ns()
        stage.tick()
        cost[i] = time.perf_counter_ns() - t
    us = cost / 1e3
    return {"ticks": ticks, "tick_us_p50": float(np.percentile(us, 50)), "tick_us_p99": float(np.percentile(us, 99)),
            "tick_us_max": float(us.max()), "rejected": stage.rejected}


def record_replay_frames(root: str) -> str:
    """Frames for the replay camera, recorded from the sim: one expert episode of the serve task, both
    cameras at the serve config's 96 px (about 100 frames; the camera loops over them)."""
    from edge_steer.runtime.config import ServeConfig
    from edge_steer.sim.demos import generate_demos
    from edge_steer.sim.env import EnvConfig
    cfg = ServeConfig.sim()
    generate_demos(cfg.robot.task, 1, 0, root, EnvConfig(image_size=cfg.cameras[0].width), workers=1)
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--engine", choices=["model", "onnx", "expert+load", "expert"], default="expert+load")
    ap.add_argument("--setups", default="motion:fifo:camera=sim,motion:fifo:camera=replay",
                    help="comma-separated where:scheduler[:camera=sim|replay], where is motion, scheduler in fifo|other")
    ap.add_argument("--out", default=None, help="JSON file, e.g. docs/results/bench_serve.json")
    ap.add_argument("--tick-samples", type=int, default=20_000, help="setpoint ticks timed alone")
    ap.add_argument("--onnx-path", default="", help=argparse.SUPPRESS)
    ap.add_argument("--replay-path", default="", help=argparse.SUPPRESS)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # internal: run this setup here
    args = ap.parse_args()
    if args.one:
        return _run_here(args)
    setups = args.setups.split(",")
    for setup in setups:
        _parse_setup(setup)
    import subprocess
    import tempfile
    load_at_start = os.getloadavg()
    tick = setpoint_tick_alone(args.tick_samples)   # first, while nothing of ours runs beside it
    replay_path = ""
    if any(_parse_setup(s)[2].get("camera") == "replay" for s in setups):
        replay_path = record_replay_frames(os.path.join(tempfile.mkdtemp(prefix="bench_serve_replay_"), "frames"))
    onnx_path = ""
    if args.engine == "onnx":   # the embedded default model, exported once, as `edge-steer export` does
        from edge_steer.export import export_onnx
        from edge_steer.models import load_model
        onnx_path = os.path.join(tempfile.mkdtemp(prefix="bench_serve_"), "default.onnx")
        export_onnx(load_model(None), onnx_path)
    runs = {}
    for setup in setups:
        env = {k: v for k, v in os.environ.items() if k != "LP_NUM_THREADS"}   # the setup decides
        cmd = [sys.executable, __file__, "--one", setup, "--seconds", str(args.seconds), "--engine", args.engine,
               "--onnx-path", onnx_path, "--replay-path", replay_path]
        res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if res.returncode:
            raise SystemExit(f"setup {setup} failed (exit {res.returncode})")
        runs[setup] = json.loads(res.stdout.strip().splitlines()[-1])
    from edge_steer.bench.docs import git_commit, this_machine
    goals = {}
    for setup, r in runs.items():
        lat = r["frame_to_first_setpoint_ms"]["p99"]
        if r["camera"] == "replay" and lat is not None:
            goals[f"{setup}: frame -> first setpoint p99 {lat:.1f} ms <= 50"] = lat <= 50.0
        rl = r["robot_loop_period_err_us_p99"]
        if rl is not None:
            goals[f"{setup}: robot loop period error p99 {rl:.0f} us < 100"] = rl < 100.0
    goals[f"setpoint tick alone p99 {tick['tick_us_p99']:.1f} us <= 100"] = tick["tick_us_p99"] <= 100.0
    out = {"command": "tools/bench_serve.py " + " ".join(sys.argv[1:]), "commit": git_commit(),
           "machine": this_machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_avg_1_5_15_at_start": [round(x, 2) for x in load_at_start], "goals_met": goals,
           "setpoint_tick_alone": tick, "runs": runs}
    base = runs[setups[0]]
    for setup in setups[1:]:   # ratios measured side by side in this one invocation
        r, ratio = runs[setup], {}
        for loop in LOOPS:
            for key in ("period_err_us_p99", "missed_ticks"):
                if r[loop].get(key):
                    ratio[f"{loop} {key}"] = round(base[loop].get(key, 0) / r[loop][key], 3)
        if r["setpoint_loop_1khz"].get("latency_ms_p99"):
            ratio["latency_ms_p99"] = round(base["setpoint_loop_1khz"]["latency_ms_p99"]
                                            / r["setpoint_loop_1khz"]["latency_ms_p99"], 3)
        if r["inference_ms"].get("p50"):
            ratio["inference_ms_p50"] = round(base["inference_ms"]["p50"] / r["inference_ms"]["p50"], 3)
        out[f"{setups[0]}_over_{setup}"] = ratio
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
