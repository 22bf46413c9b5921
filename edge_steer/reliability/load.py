"""Load: N clients in a child process (`python -m edge_steer.reliability.load ...`, lean: no torch, no
MuJoCo) hammering the command socket while the arm works, and e-stop latency under load."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import zmq

from edge_steer.reliability.cell import Cell, pct
from edge_steer.reliability.faults import _running


def _load_child(endpoint: str, n: int, seconds: float, timeout_ms: int, kinds: list[str]) -> dict:
    """N DEALER clients in one lean process, each always one request in flight, cycling through `kinds`;
    replies matched by id."""
    from edge_steer.runtime.protocol import encode_request
    ctx = zmq.Context()
    socks, sent_at = [], {}
    poller = zmq.Poller()
    rtts, codes = [], {}
    sent = answered = timeouts = mismatched = 0
    rid = 0

    def send(i: int) -> None:
        nonlocal rid, sent
        rid += 1
        socks[i].send_multipart([b"", encode_request(kinds[rid % len(kinds)], id=rid)])
        sent_at[i] = (rid, time.perf_counter())
        sent += 1

    for i in range(n):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        socks.append(s)
        poller.register(s, zmq.POLLIN)
    index = {s: i for i, s in enumerate(socks)}
    t_end = time.perf_counter() + seconds
    for i in range(n):
        send(i)
    while sent_at:
        now = time.perf_counter()
        for sock, _ in poller.poll(50):
            i = index[sock]
            frames = sock.recv_multipart()
            want, t0 = sent_at.pop(i)
            rtts.append((time.perf_counter() - t0) * 1e3)
            reply = msgpack.unpackb(frames[-1], raw=False)
            mismatched += reply.get("id") != want
            answered += 1
            key = "ok" if reply["ok"] else reply["error"]
            codes[key] = codes.get(key, 0) + 1
            if time.perf_counter() < t_end:
                send(i)
        for i, (_, t0) in list(sent_at.items()):
            if (now - t0) * 1e3 > timeout_ms:
                timeouts += 1
                sent_at.pop(i)
    for s in socks:
        s.close(linger=0)
    ctx.term()
    r = np.array(rtts)
    return {"clients": n, "seconds": seconds, "sent": sent, "answered": answered, "timeouts": timeouts,
            "mismatched_ids": int(mismatched), "codes": codes, "req_per_s": round(answered / seconds, 1),
            "rtt_ms": {"p50": pct(r, 50), "p99": pct(r, 99), "max": float(r.max()) if r.size else None}}


# while the arm runs, `start` is a no-op and `recover` a refusal (bad_state): commands that change nothing
LOAD_MIX = "status,start,status,recover"


def start_load(endpoint: str, n: int, seconds: float, timeout_ms: int = 5000, kinds: str = LOAD_MIX) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge_steer.reliability.load", endpoint, str(n), str(seconds), str(timeout_ms),
                             kinds], stdout=subprocess.PIPE, text=True)


def finish_load(p: subprocess.Popen, timeout: float = 120) -> dict:
    out, _ = p.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def _keep_working(cell: Cell, stop: threading.Event, every_s: float = 12.0) -> threading.Thread:
    """The arm does the task throughout: re-instruct (a new episode, the expert re-plans) every 12 s."""
    from edge_steer.client import Client
    cl = Client(cell.endpoint, timeout_ms=5000)
    texts = [cell.daemon.robot.sim.task.instruction, cell.daemon.robot.sim.task.instruction + " again"]

    def run():
        k = 0
        while not stop.is_set():
            if cl.status()["state"] != "FAULT":
                cl.instruct(texts[k % 2])
            k += 1
            stop.wait(every_s)
        cl.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def load_level(cell: Cell, n: int, seconds: float) -> dict:
    d = cell.daemon
    s0 = cell.client.status()
    chunks0, faults0 = s0["chunks"], sum(t["to"] == "FAULT" for t in s0["transitions"])
    d.reset_loop_timing()
    t0 = time.perf_counter()
    client = finish_load(start_load(cell.endpoint, n, seconds), timeout=seconds + 60) if n else None
    if not n:
        time.sleep(seconds)
    el = time.perf_counter() - t0
    s = cell.client.status()
    return {"clients": n, "load": client, "setpoint_loop": s["setpoint_loop"], "robot_loop": s["robot_loop"],
            "chunks_per_s": round((s["chunks"] - chunks0) / el, 2), "state": s["state"],
            "faults": sum(t["to"] == "FAULT" for t in s["transitions"]) - faults0}


def estop_latency(cell: Cell, cycles: int, background_clients: int = 0) -> dict:
    """Arm running; `estop` sent; latency to the controller stopped (stop_controller returned) and to the
    reply; then recover and go again. Optionally under background client load."""
    c = cell.client
    # status only: a `recover` from the load would legitimately undo the e-stop
    bg = start_load(cell.endpoint, background_clients, 3600, kinds="status") if background_clients else None
    stop_lat, reply_lat = [], []
    try:
        for _ in range(cycles):
            _running(cell, chunks=2)
            time.sleep(random.uniform(0.05, 0.3))
            n = len(cell.stops)
            t0 = time.perf_counter()
            c.estop()
            reply_lat.append((time.perf_counter() - t0) * 1e3)
            if len(cell.stops) > n:
                stop_lat.append((cell.stops[n] - t0) * 1e3)
            assert not cell.daemon.setpoint.driving
            c.recover()
    finally:
        if bg is not None:
            bg.send_signal(signal.SIGTERM)
            bg.wait(timeout=10)
        c.stop() if c.status()["state"] != "IDLE" else None
    return {"cycles": cycles, "background_clients": background_clients, "stopped": len(stop_lat),
            "to_controller_stopped_ms": {"p50": pct(stop_lat, 50), "p99": pct(stop_lat, 99),
                                         "max": max(stop_lat) if stop_lat else None},
            "to_reply_ms": {"p50": pct(reply_lat, 50), "p99": pct(reply_lat, 99)}}


if __name__ == "__main__":
    print(json.dumps(_load_child(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]),
                                 sys.argv[5].split(","))))
