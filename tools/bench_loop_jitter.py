"""What disturbs a Python 1 kHz thread? SimPanda's control loop alone, then with each load the serve
daemon puts beside it, one at a time, in one run (docs/serve.md).

    .venv/bin/python tools/bench_loop_jitter.py [--seconds 6] [--switch 0.0005] [--cases alone,cameras,...]
                                                [--schedulers other,fifo] [--where thread,process]

Cases: `alone`; `cameras` (front + wrist SimCamera at 30 fps, 96 px, software EGL); `inference` (the
default model, 1 torch thread, 10 Hz); `setter` (a pure-Python 1 kHz loop like the setpoint stage);
`busy` (a pure-Python thread that never sleeps: the worst case for the GIL); `daemon` (cameras +
inference + setter together). Period errors are binned 2.3 % wide (edge_steer.realtime.DurationHistogram,
what the daemon reports). Each case runs once per scheduler of the 1 kHz loop: `other` (SCHED_OTHER,
as any Python thread) and `fifo` (SCHED_FIFO 20, as libfranka raises its control thread; the setter
load then runs SCHED_FIFO 10 like the setpoint stage), and once per place of the loop: `thread` (beside
the loads, in their process) and `process` (SimPandaProcess: its own interpreter; the loads stay here and
the cameras render its mirror world). Prints one row per (case, where, scheduler): ticks, missed ticks,
period error p50/p99/max (at wake-up, as the daemon reports it), tick run time, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

CASES = {"alone": (), "cameras": ("cameras",), "inference": ("inference",), "setter": ("setter",),
         "busy": ("busy",), "daemon": ("cameras", "inference", "setter")}


def _loads(kinds, world, stop: threading.Event) -> tuple[list[threading.Thread], list, list]:
    threads, cams, rt = [], [], []   # rt: the threads to raise to SCHED_FIFO 10 with `fifo`
    if "cameras" in kinds:
        from edge_steer.sim.camera import SimCamera, SimConfig
        for name in ("front", "wrist"):
            cam = SimCamera(world, name)
            conf = SimConfig()
            conf.enable_stream("color", 96, 96, "rgb8", 30)
            cam.start(conf)
            cams.append(cam)
    if "inference" in kinds:
        import torch

        from edge_steer.models import DEFAULT_MODEL_DIR, EdgeVLA
        torch.set_num_threads(1)
        model = EdgeVLA.from_pretrained(DEFAULT_MODEL_DIR)
        obs = {"observation.images.front": np.zeros((96, 96, 3), np.uint8),
               "observation.images.wrist": np.zeros((96, 96, 3), np.uint8),
               "observation.state": np.zeros(8, np.float32)}
        model.predict(obs, "put the red cube on the blue plate")   # warm-up outside the window

        def infer():
            while not stop.is_set():
                t = time.perf_counter()
                model.predict(obs, "put the red cube on the blue plate")
                time.sleep(max(0.0, 0.1 - (time.perf_counter() - t)))
        threads.append(threading.Thread(target=infer, daemon=True))
    if "setter" in kinds:
        def setter():
            next_t = time.perf_counter()
            while not stop.is_set():
                s = 0.0
                for i in range(200):   # about the setpoint stage's per-tick arithmetic
                    s += i * 0.5
                next_t += 0.001
                rem = next_t - time.perf_counter()
                if rem > 0:
                    time.sleep(rem)
        threads.append(threading.Thread(target=setter, daemon=True))
        rt.append(threads[-1])
    if "busy" in kinds:
        def busy():
            while not stop.is_set():
                sum(range(1000))
        threads.append(threading.Thread(target=busy, daemon=True))
    return threads, cams, rt


def run_case(name: str, seconds: float, scheduler: str, where: str = "thread") -> dict:
    from edge_steer.realtime import LIBFRANKA_PRIORITY, make_realtime
    from edge_steer.sim.panda import SimPanda
    from edge_steer.sim.panda_process import SimPandaProcess
    from edge_steer.sim.tasks import get_task
    from edge_steer.sim.world import World

    spec = get_task("red_cube_on_blue_plate").sample_scene(np.random.default_rng(0), 96).spec
    fifo = scheduler == "fifo"
    prio = LIBFRANKA_PRIORITY if fifo else 0
    if where == "process":   # the loop in its own interpreter; the loads here, on its mirror world
        arm = SimPandaProcess(spec, rt_priority=prio)
    else:
        world = World(spec)
        world.reset()
        arm = SimPanda(world, realtime=True, rt_priority=prio)
    if fifo and arm.rt_refused:
        raise SystemExit(f"the fifo case needs real-time scheduling: {arm.rt_refused}")
    stop = threading.Event()
    threads, cams, rt = _loads(CASES[name], arm.world, stop)
    for t in threads:
        t.start()
        if fifo and t in rt and (why := make_realtime(t, 10)):
            raise SystemExit(why)
    time.sleep(1.0)   # loads running before the window opens
    arm.reset_loop_timing()
    time.sleep(seconds)
    t = arm.loop_timing()
    stop.set()
    for c in cams:
        c.stop()
    arm.close()
    return {"case": name, "where": where, "scheduler": t["scheduling"].replace(" (own process)", ""),
            "ticks": t["ticks"], "missed": int(t["missed_ticks"]), "err_us_p50": t["period_err_us_p50"],
            "err_us_p99": t["period_err_us_p99"], "err_us_max": t["period_err_us_max"], "tick_us_p50": t["tick_us_p50"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--switch", type=float, default=0.0005, help="sys.setswitchinterval (the daemon's: 0.0005)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--schedulers", default="other,fifo", help="the 1 kHz loop's: other (SCHED_OTHER), fifo (SCHED_FIFO)")
    ap.add_argument("--where", default="thread,process",
                    help="where the 1 kHz loop runs: thread (beside the loads) or process (its own interpreter)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sys.setswitchinterval(args.switch)
    import logging
    logging.disable(logging.WARNING)
    rows = []
    for name in args.cases.split(","):
        if name not in CASES:
            raise SystemExit(f"unknown case {name!r}; choose from {sorted(CASES)}")
        for where in args.where.split(","):
            if where not in ("thread", "process"):
                raise SystemExit(f"unknown --where {where!r}; choose from thread, process")
            for sched in args.schedulers.split(","):
                if sched not in ("other", "fifo"):
                    raise SystemExit(f"unknown scheduler {sched!r}; choose from other, fifo")
                r = run_case(name, args.seconds, sched, where)
                rows.append(r)
                print(f"{name:10s} {where:8s} {r['scheduler']:13s} ticks {r['ticks']:6d} missed {r['missed']:5d}   "
                      f"period error p50 {r['err_us_p50']:7.1f}  p99 {r['err_us_p99']:8.1f}  max {r['err_us_max']:8.1f} us  "
                      f"tick p50 {r['tick_us_p50']:6.1f} us", flush=True)
    by = {(r["case"], r["where"], r["scheduler"].split()[0]): r for r in rows}
    for where in args.where.split(","):
        pairs = [(c, by[(c, where, "SCHED_OTHER")], by[(c, where, "SCHED_FIFO")]) for c in CASES
                 if (c, where, "SCHED_OTHER") in by and (c, where, "SCHED_FIFO") in by]
        if pairs:
            print(f"{where}: p99 SCHED_FIFO / SCHED_OTHER: "
                  + ", ".join(f"{c} {f['err_us_p99'] / o['err_us_p99']:.2f}x" for c, o, f in pairs))
    for c in CASES:
        for sched in ("SCHED_OTHER", "SCHED_FIFO"):
            if (c, "thread", sched) in by and (c, "process", sched) in by:
                p, t = by[(c, "process", sched)], by[(c, "thread", sched)]
                print(f"{c} {sched}: p99 process / thread {p['err_us_p99'] / t['err_us_p99']:.2f}x, "
                      f"missed {p['missed']} vs {t['missed']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"seconds": args.seconds, "switch_interval": args.switch, "cpus": len(os.sched_getaffinity(0)),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
