"""Injected faults, each with the safe outcome it must have and the check that the daemon goes back to
work after it; and killing a serving daemon (a child process) while it records."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq

from edge_steer.reliability.cell import Cell, reset_cell
from edge_steer.runtime.launch import ServeProcess, wait_for


@dataclass(frozen=True)
class Verdict:
    """What one fault scenario observed: whether the safe outcome held, and what was seen."""
    ok: bool
    detail: str


@dataclass
class FaultResult:
    fault: str
    expected: str
    observed: str
    survived: bool
    seconds: float = 0.0


def _running(cell: Cell, chunks: int = 2) -> None:
    c = cell.client
    n0 = c.status()["chunks"]
    c.instruct(cell.daemon.robot.sim.task.instruction)
    wait_for(lambda: c.status()["chunks"] >= n0 + chunks, timeout=15)


def _back_to_work(cell: Cell) -> bool:
    """Survived = the daemon answers, recovers (if faulted) to IDLE and runs chunks again."""
    reset_cell(cell)
    _running(cell)
    ok = cell.client.status()["state"] == "RUNNING"
    cell.client.stop()
    return ok


def _fault(name: str, expected: str, fn: Callable[[Cell], Verdict], cell: Cell) -> FaultResult:
    t0 = time.perf_counter()
    try:
        v = fn(cell)
        observed, ok = v.detail, v.ok
    except Exception as e:  # noqa: BLE001 - a scenario that breaks is reported, not hidden
        observed, ok = f"{type(e).__name__}: {e}", False
    try:
        ok = _back_to_work(cell) and ok
    except Exception as e:  # noqa: BLE001
        observed, ok = observed + f"; not back to work: {type(e).__name__}: {e}", False
    return FaultResult(name, expected, observed, ok, round(time.perf_counter() - t0, 1))


def f_camera_stall_short(cell: Cell) -> Verdict:
    c = cell.client
    _running(cell)
    cell.cameras[0].inner.pipeline.stalled = True
    wait_for(lambda: c.status()["hold"] == "stale_frame", timeout=3)
    cell.cameras[0].inner.pipeline.stalled = False
    wait_for(lambda: c.status()["hold"] is None, timeout=3)
    s = c.status()
    return Verdict(s["state"] == "RUNNING", "held, resumed RUNNING" if s["state"] == "RUNNING" else f"state {s['state']}")


def f_camera_stall_long(cell: Cell) -> Verdict:
    c = cell.client
    _running(cell)
    cell.cameras[1].inner.pipeline.stalled = True
    s = wait_for(lambda: (s := c.status())["state"] == "FAULT" and s, timeout=6)
    return Verdict(s["fault"].startswith("camera_stale"), s["fault"][:40])


def f_camera_unplug_replug(cell: Cell) -> Verdict:
    """Cable out for ~0.15 s (< camera_fault_ms): errors counted, re-opened, RUNNING continues."""
    c = cell.client
    cam = cell.cameras[0]
    _running(cell)
    errs, reopens = c.status()["camera_errors"][cam.name], cam.reopens
    cam.unplugged = True
    wait_for(lambda: c.status()["camera_errors"][cam.name] > errs, timeout=3)
    time.sleep(0.15)
    cam.unplugged = False
    wait_for(lambda: cam.reopens > reopens, timeout=5)
    n = c.status()["chunks"]
    wait_for(lambda: c.status()["chunks"] > n, timeout=5)
    s = c.status()
    running = s["state"] == "RUNNING"
    return Verdict(running, f"{s['camera_errors'][cam.name] - errs} errors, re-opened, RUNNING" if running
                   else f"state {s['state']} ({s['fault']})")


def f_camera_unplug_long(cell: Cell) -> Verdict:
    """Cable out past camera_fault_ms: FAULT; plugged back, `recover` returns to IDLE."""
    c = cell.client
    cam = cell.cameras[1]
    _running(cell)
    cam.unplugged = True
    s = wait_for(lambda: (s := c.status())["state"] == "FAULT" and s, timeout=6)
    cam.unplugged = False
    return Verdict(s["fault"].startswith("camera_stale"), s["fault"][:40])


def _engine_fault(mode: str, want: str) -> Callable[[Cell], Verdict]:
    def run(cell: Cell) -> Verdict:
        c = cell.client
        _running(cell)
        cell.engine.mode, cell.engine.delay_s = mode, 0.6
        d = cell.daemon
        wait_for(lambda: d.state.value == "FAULT", timeout=8, step=0.002)
        p0 = np.array(d.setpoint.commanded[0])
        time.sleep(0.3)  # braking from max_speed at max_accel takes 0.125 s
        p1 = np.array(d.setpoint.commanded[0])
        time.sleep(0.1)
        braked, still = float(np.abs(p1 - p0).max()), float(np.abs(np.array(d.setpoint.commanded[0]) - p1).max())
        s = c.status()
        # v^2 / 2a at the configured limits, per axis
        bound = d.cfg.safety.max_speed ** 2 / (2 * d.cfg.safety.max_accel) + 1e-3
        ok = want in s["fault"] and braked <= bound and still < 1e-6
        return Verdict(ok, f"{s['fault'][:40]}; braked within {braked * 1e3:.1f} mm "
                f"(bound {bound * 1e3:.0f}), then still")
    return run


def f_robot_reflex(cell: Cell) -> Verdict:
    c = cell.client
    _running(cell)
    cell.daemon.robot.arm.inject_fault("cartesian_reflex")
    s = wait_for(lambda: (s := c.status())["state"] == "FAULT" and s, timeout=5)
    ok = "cartesian_reflex" in s["fault"] and not cell.daemon.setpoint.driving
    return Verdict(ok, f"{s['fault'][:40]}, controller dropped")


def f_robot_link_lost(cell: Cell) -> Verdict:
    """No robot state: FAULT and hold; `recover` is refused while the link is down, works once it is back."""
    from edge_steer.client import ClientError
    c = cell.client
    _running(cell)
    cell.link.state_lost = True
    s = wait_for(lambda: (s := c.status())["state"] == "FAULT" and s, timeout=5)
    try:
        c.recover()
        refused = False
    except ClientError as e:
        refused = e.code == "recover_failed"
    cell.link.state_lost = False
    ok = refused and "connection lost" in s["fault"]
    return Verdict(ok, f"{s['fault'][:48]}; recover refused while down: {refused}")


def f_controller_lost(cell: Cell) -> Verdict:
    """The controller's setter raises on the 1 kHz side (robot dropped it): hold, FAULT."""
    c = cell.client
    _running(cell)
    if cell.daemon.robot.arm.motion is not None:      # the stage and its controller live in the robot's process
        from edge_steer.testing.setpoint_probe import fail_setter
        fail_setter(cell.daemon.robot.arm, "libfranka: controller not running")
    else:
        ctrl = cell.daemon.setpoint.controller

        def broken(*a):
            raise RuntimeError("libfranka: controller not running")
        ctrl.set_control = broken
    s = wait_for(lambda: (s := c.status())["state"] == "FAULT" and s, timeout=5)
    ok = s["fault"].startswith("controller") and not cell.daemon.setpoint.driving
    return Verdict(ok, s["fault"][:48])


def f_client_vanishes(cell: Cell) -> Verdict:
    """Clients that send and disconnect before the reply, and one that floods requests and never reads:
    the server drops the undeliverable replies and keeps serving everyone else."""
    ctx = zmq.Context.instance()
    from edge_steer.runtime.protocol import encode_request
    before = cell.daemon.server.requests
    for i in range(50):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(cell.endpoint)
        s.send_multipart([b"", encode_request("status", id=i)])
        s.close(linger=0)
    flood = ctx.socket(zmq.DEALER)
    flood.setsockopt(zmq.LINGER, 0)
    flood.setsockopt(zmq.SNDHWM, 0)
    flood.connect(cell.endpoint)
    for i in range(3000):
        flood.send_multipart([b"", encode_request("recover", id=i)], zmq.NOBLOCK)
    t0 = time.perf_counter()
    cell.client.status()
    rtt = (time.perf_counter() - t0) * 1e3
    time.sleep(0.2)
    flood.close(linger=0)  # gone, with its unread replies and any requests still queued on its side
    n = -1
    while n != cell.daemon.server.requests:  # until the server has drained what reached it
        n = cell.daemon.server.requests
        time.sleep(0.2)
    t0 = time.perf_counter()
    st = cell.client.status()["state"]
    rtt2 = (time.perf_counter() - t0) * 1e3
    alive = cell.daemon.server._thread.is_alive() and st == "IDLE"
    return Verdict(alive, f"{n - before} requests handled; a status took {rtt:.0f} ms during the "
                          f"flood, {rtt2:.0f} ms after")


FAULTS: list[tuple[str, str, Callable[[Cell], Verdict]]] = [
    ("camera stall 0.3 s", "hold, resume by itself", f_camera_stall_short),
    ("camera stall > camera_fault_ms", "FAULT camera_stale", f_camera_stall_long),
    ("camera unplugged 0.15 s, re-plugged", "errors counted, re-opened, keeps RUNNING", f_camera_unplug_replug),
    ("camera unplugged > camera_fault_ms", "FAULT camera_stale; recover after re-plug", f_camera_unplug_long),
    ("engine raises", "FAULT engine, arm brakes", _engine_fault("raise", "injected engine failure")),
    ("engine returns NaN", "FAULT invalid chunk, arm brakes", _engine_fault("nan", "invalid chunk")),
    ("engine exceeds its deadline (0.6 s)", "chunks dropped, FAULT inference_deadline",
     _engine_fault("slow", "inference_deadline")),
    ("robot reflex", "FAULT robot_error, controller dropped", f_robot_reflex),
    ("robot link lost (state reads fail)", "FAULT, hold; recover refused until the link is back", f_robot_link_lost),
    ("controller setter fails (1 kHz side)", "FAULT controller, hold", f_controller_lost),
    ("ZMQ clients vanish mid-request / flood without reading", "others still served", f_client_vanishes),
]


def run_faults(cell: Cell, names: list[str] | None = None) -> list[FaultResult]:
    out = []
    for name, expected, fn in FAULTS:
        if names is None or name in names:
            out.append(_fault(name, expected, fn, cell))
    return out


# ---- 2b. killing the daemon while it records (a separate process) -----------------------------------------
def serve_process(tmp: Path, rec: Path, name: str) -> ServeProcess:
    return ServeProcess(tmp, f'[record]\ndir = "{rec}"\n[engine]\nbackend = "expert"\n[robot]\nstop_on_success = false\nfresh_scene = false\n',
                        name=name).start()


def _record_episode(c, instruction: str, episode_s: float) -> None:
    """Record one complete episode on a fresh daemon: recording on, run `episode_s` past the first chunks,
    stop, and wait until the recorder has saved it."""
    c.record(True)
    c.instruct(instruction)
    wait_for(lambda: c.status()["chunks"] >= 5, timeout=30)
    time.sleep(episode_s)
    c.stop()
    wait_for(lambda: c.status()["recorder"]["saved_episodes"] == 1, timeout=20)


def kill_while_recording(tmp: Path, sig: int, episode_s: float = 1.2) -> dict:
    """Record one complete episode, start a second, then `sig` the daemon mid-episode. Restart on the same
    dataset and record a third. Returns what the dataset holds after each step."""
    from edge_steer.data import Dataset
    rec = tmp / f"rec_{signal.Signals(sig).name}"
    serve = serve_process(tmp, rec, f"serve_{rec.name}_killed")
    c = serve.client
    try:
        _record_episode(c, "first episode", episode_s)
        c.instruct("killed mid-episode")
        n = c.status()["chunks"]
        wait_for(lambda: c.status()["chunks"] >= n + 5, timeout=30)
        code = serve.signal(sig, timeout=30)
    finally:
        serve.close()
    ds = Dataset(rec)
    after_kill = {"exit_code": code, "episodes": ds.num_episodes, "tasks": list(ds.tasks),
                  "frames": len(ds), "lengths": [e.length for e in ds.episodes],
                  "tmp_files_left": len(list(rec.rglob(".*.tmp")))}
    serve = serve_process(tmp, rec, f"serve_{rec.name}_restarted")
    c = serve.client
    try:
        _record_episode(c, "after restart", episode_s)
        c.shutdown()
        serve.proc.wait(timeout=30)
    finally:
        serve.close()
    ds = Dataset(rec)
    frames = 0
    for e in ds.episodes:  # every feature of every frame decoded, images included
        ep = ds.episode(e.index)
        frames += min(len(v) for v in ep.values())
    return {"signal": signal.Signals(sig).name, "after_kill": after_kill,
            "after_restart": {"episodes": ds.num_episodes, "tasks": list(ds.tasks), "frames": len(ds),
                              "indices": [e.index for e in ds.episodes], "readable_frames": frames}}
