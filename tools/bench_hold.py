"""How far the arm travels after `pause` and after `estop` (docs/serve.md, "Pause and e-stop"): an
in-process sim daemon whose engine pushes the TCP along +x at --speed, the TCP read from the robot every
10 ms for 2 s after the command's reply.

    .venv/bin/python tools/bench_hold.py [--speed 0.1]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from edge_steer.client import Client
from edge_steer.runtime.config import ServeConfig
from edge_steer.runtime.daemon import Daemon
from edge_steer.runtime.launch import free_endpoint, wait_for


class Push:
    """Chunks that move the target +x at `speed` m/s (10 actions of 1/10 s)."""
    backend = "push"

    def __init__(self, speed: float):
        self.speed = speed

    def predict(self, obs, instruction):
        a = np.zeros((10, 7))
        a[:, 0] = self.speed / 10
        return a

    def metadata(self):
        return {"backend": self.backend}

    def set_steering(self, delta):
        pass


def travel(d: Daemon, c: Client, command: str) -> dict:
    c.instruct("push forward")
    wait_for(lambda: c.status()["chunks"] > 8, timeout=30)
    time.sleep(0.5)
    getattr(c, command)()
    t0, trace = time.perf_counter(), []
    while (t := time.perf_counter() - t0) < 2.0:
        trace.append((t, d.robot.read().position.copy()))
        time.sleep(0.01)
    at = lambda s: min(trace, key=lambda e: abs(e[0] - s))[1]  # noqa: E731
    return {f"{a}-{b}s_mm": round(1e3 * float(np.linalg.norm(at(b) - at(a))), 2) for a, b in ((0, 1), (0, 2), (0.5, 2))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--speed", type=float, default=0.1, help="m/s along +x")
    args = ap.parse_args()
    out: dict = {"speed_m_s": args.speed}
    cmd, tel = free_endpoint(), free_endpoint()
    cfg = ServeConfig.sim().with_(zmq={"command": cmd, "telemetry": tel},
                                  robot={"stop_on_success": False, "fresh_scene": False})
    d = Daemon(cfg, engine=Push(args.speed)).start()
    c = Client(cmd, tel, timeout_ms=20000)
    try:
        out["pause"] = travel(d, c, "pause")
        c.stop()
        out["estop"] = travel(d, c, "estop")
        c.recover()
    finally:
        c.close()
        d.close()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
