"""The daemon in-process on the sim cell: every command over ZMQ, each watchdog, faults, recording,
telemetry, and the setpoint stage's hand-over. A scripted fake engine keeps it fast."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest

from edge_steer.client import Client, ClientError
from edge_steer.runtime.config import ServeConfig
from edge_steer.runtime.daemon import Daemon
from edge_steer.runtime.launch import free_endpoint, wait_for
from edge_steer.runtime.safety import SafetyFilter
from edge_steer.runtime.setpoint import Chunk, SetpointStage

pytestmark = pytest.mark.timeout(120)


class FakeEngine:
    """Moves the target +x by `dx` per step; `mode` injects the failures the daemon must survive."""
    backend = "fake"

    def __init__(self):
        self.mode, self.dx, self.calls, self.steering, self.delay = "ok", 0.002, 0, None, 0.0

    def predict(self, obs, instruction):
        self.calls += 1
        assert obs["observation.images.front"].dtype == np.uint8 and obs["observation.state"].shape == (8,)
        if self.mode == "raise":
            raise RuntimeError("engine exploded")
        if self.mode == "slow":
            time.sleep(0.6)
        time.sleep(self.delay)
        a = np.zeros((10, 7))
        a[:, 0] = self.dx
        if self.mode == "nan":
            a[3, 1] = np.nan
        return a

    def metadata(self):
        return {"backend": self.backend}

    def set_steering(self, delta):
        self.steering = delta


# the setpoint stage runs in the sim robot's process (runtime/motion.py)
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cmd, tel = free_endpoint(), free_endpoint()
    steer = tmp_path_factory.mktemp("steering")
    (steer / "red_cube_in_front_of_blue_plate").mkdir()
    cfg = ServeConfig.sim().with_(
        zmq={"command": cmd, "telemetry": tel},
        engine={"steering_dir": str(steer)},
        safety={"stale_frame_ms": 300.0, "camera_fault_ms": 1200.0, "inference_deadline_ms": 400.0,
                "inference_stop_ms": 1000.0},
        record={"dir": str(tmp_path_factory.mktemp("rec") / "ds")},
        robot={"stop_on_success": False, "fresh_scene": False})
    engine = FakeEngine()
    d = Daemon(cfg, engine=engine).start()
    c = Client(cmd, tel, timeout_ms=5000)
    yield d, c, engine
    c.close()
    d.close()


@pytest.fixture
def daemon(served):
    d, c, e = served
    e.mode, e.delay = "ok", 0.0
    for cam in d.cameras.cameras:
        cam.pipeline.stalled = False
    yield d, c, e
    st = c.status()["state"]
    if st == "FAULT":
        c.recover()
    elif st != "IDLE":
        c.stop()


def test_instruct_runs_pause_holds_stop_idles(daemon):
    d, c, e = daemon
    with pytest.raises(ClientError, match="no_instruction"):
        c.start() if d.instruction is None else (_ for _ in ()).throw(ClientError("no_instruction", ""))
    x0 = c.status()["tcp"][0]
    assert c.instruct("push forward")["state"] == "RUNNING"
    wait_for(lambda: c.status()["chunks"] > 5)
    wait_for(lambda: c.status()["tcp"][0] > x0 + 0.01)
    assert c.pause()["state"] == "PAUSED"
    time.sleep(0.3)
    p1 = c.status()["tcp"][0]
    time.sleep(0.5)
    assert abs(c.status()["tcp"][0] - p1) < 2e-3  # held
    with pytest.raises(ClientError, match="bad_state"):
        c.pause()
    assert c.start()["state"] == "RUNNING"
    assert c.stop()["state"] == "IDLE"
    s = c.status()
    assert [t["to"] for t in s["transitions"]][-4:] == ["RUNNING", "PAUSED", "RUNNING", "IDLE"]
    assert s["setpoint_loop"]["rejected"] == 0


def test_estop_stops_the_controller_and_recover_needs_command(daemon):
    d, c, e = daemon
    c.instruct("push forward")
    wait_for(lambda: c.status()["chunks"] > 2)
    r = c.estop()
    assert r["state"] == "FAULT" and d.setpoint.controller is None and d.robot.read().mode == "kIdle"
    with pytest.raises(ClientError, match="recover first"):
        c.instruct("go again")
    with pytest.raises(ClientError, match="bad_state"):
        c.start()
    time.sleep(0.3)
    assert c.status()["state"] == "FAULT"  # stays until told
    assert c.recover()["state"] == "IDLE"
    assert d.robot.read().mode == "kMove"          # a controller runs again


def test_robot_reflex_faults(daemon):
    d, c, e = daemon
    c.instruct("push forward")
    d.robot.arm.inject_fault("cartesian_reflex")
    wait_for(lambda: c.status()["state"] == "FAULT")
    assert "cartesian_reflex" in c.status()["fault"]
    assert c.recover()["state"] == "IDLE"


def test_fast_joints_fault_before_the_robot_reflex(daemon, monkeypatch):
    """The monitor checks joint speeds against `joint_velocity_share` of their limits; with a share so
    small that an ordinary 2 cm/s push exceeds it, the daemon faults and names the joint."""
    d, c, e = daemon
    monkeypatch.setattr(d.monitor, "cfg", d.cfg.with_(safety={"joint_velocity_share": 0.005}))
    c.instruct("push forward")
    wait_for(lambda: c.status()["state"] == "FAULT")
    assert c.status()["fault"].startswith("joint_velocity_margin: joint ")
    monkeypatch.undo()
    assert c.recover()["state"] == "IDLE"


@pytest.mark.parametrize("mode, reason", [("raise", "engine exploded"), ("nan", "invalid chunk")])
def test_engine_errors_fault_and_move_nothing(daemon, mode, reason):
    d, c, e = daemon
    e.mode = mode
    p0 = np.array(c.status()["tcp"][:3])
    c.instruct("push forward")
    wait_for(lambda: c.status()["state"] == "FAULT")
    assert reason in c.status()["fault"]
    time.sleep(0.2)
    assert np.linalg.norm(np.array(c.status()["tcp"][:3]) - p0) < 3e-3


def test_slow_engine_chunks_dropped_then_inference_deadline(daemon):
    d, c, e = daemon
    e.mode = "slow"
    dropped = c.status()["chunks_dropped"]
    c.instruct("push forward")
    wait_for(lambda: c.status()["state"] == "FAULT", timeout=8)
    s = c.status()
    assert s["fault"].startswith("inference_deadline") and s["chunks_dropped"] > dropped


def test_stale_camera_holds_then_faults(daemon):
    d, c, e = daemon
    c.instruct("push forward")
    wait_for(lambda: c.status()["chunks"] > 0)
    d.cameras.cameras[0].pipeline.stalled = True
    wait_for(lambda: c.status()["hold"] == "stale_frame", timeout=3)
    p = c.status()["tcp"][0]
    wait_for(lambda: c.status()["state"] == "FAULT", timeout=5)
    assert c.status()["fault"].startswith("camera_stale")
    assert abs(c.status()["tcp"][0] - p) < 0.01


def test_stale_camera_recovers_by_itself_when_frames_return(daemon):
    d, c, e = daemon
    c.instruct("push forward")
    wait_for(lambda: c.status()["chunks"] > 0)
    d.cameras.cameras[1].pipeline.stalled = True
    wait_for(lambda: c.status()["hold"] == "stale_frame", timeout=3)
    d.cameras.cameras[1].pipeline.stalled = False
    wait_for(lambda: c.status()["hold"] is None, timeout=3)
    assert c.status()["state"] == "RUNNING"


def test_set_steering(daemon):
    d, c, e = daemon
    assert c.set_steering("red_cube_in_front_of_blue_plate")["steering"] == "red_cube_in_front_of_blue_plate"
    assert str(e.steering).endswith("red_cube_in_front_of_blue_plate")
    with pytest.raises(ClientError, match="no_steering"):
        c.set_steering("no_such_task")
    with pytest.raises(ClientError, match="bad_field"):
        c.set_steering("../etc")
    assert c.set_steering(None)["steering"] is None and e.steering is None


def test_record_on_off_writes_episodes(daemon):
    from edge_steer.data import Dataset
    d, c, e = daemon
    assert c.record(True)["recording"] is True
    c.instruct("record this")
    wait_for(lambda: c.status()["chunks"] > 0)
    time.sleep(1.0)
    c.stop()
    c.instruct("and this")
    time.sleep(0.8)
    c.record(False)
    c.stop()
    wait_for(lambda: c.status()["recorder"]["saved_episodes"] >= 2)
    ds = Dataset(d.cfg.record.dir)
    assert ds.num_episodes >= 2 and len(ds) > 5
    assert set(ds.tasks) >= {"record this", "and this"}


def test_bad_messages_get_error_replies_and_move_nothing(daemon):
    d, c, e = daemon
    p0 = np.array(c.status()["tcp"][:3])
    cases = [b"\xc1", msgpack.packb({"v": 1, "cmd": "fly"}), msgpack.packb({"v": 9, "cmd": "start"}),
             msgpack.packb({"v": 1, "cmd": "instruct", "text": 3}), b"x" * (2 * d.cfg.zmq.max_message_bytes)]
    for payload in cases:
        r = c.request_raw(payload)
        assert r["ok"] is False and r["error"] and r["reason"]
    assert c.status()["state"] == "IDLE"
    assert np.linalg.norm(np.array(c.status()["tcp"][:3]) - p0) < 2e-3


def test_telemetry_at_least_50_hz(daemon):
    d, c, e = daemon
    t0 = time.time()
    msgs = list(c.telemetry(max_messages=60))
    rate = len(msgs) / (time.time() - t0)
    assert len(msgs) == 60 and rate >= 50, rate
    m = msgs[-1]
    assert {"state", "tcp", "setpoint", "q", "seq"} <= set(m)


# ---- the setpoint stage without threads -----------------------------------------------------------
class RecordingController:
    def __init__(self):
        self.p = []

    def set_control(self, position, orientation, q_nullspace):
        self.p.append(np.array(position))


def _stage(**rates):
    cfg = ServeConfig.sim().with_(rates=rates)
    f = SafetyFilter(cfg.safety, 0.001)
    sp = SetpointStage(cfg.rates, f, lambda close: None)
    sp.reset((0.4, 0.0, 0.3), (1.0, 0.0, 0.0, 0.0))
    sp.controller = RecordingController()
    sp.measured_p = np.array([0.4, 0.0, 0.3])
    sp.hold_reason = None
    return sp


def _running_stage_and_push_x() -> tuple[SetpointStage, np.ndarray]:
    """A stage that has ticked a while, and a chunk moving +x 1 cm per action."""
    sp = _stage()
    for _ in range(30):
        sp.tick()
    a = np.zeros((10, 7))
    a[:, 0] = 0.01
    return sp, a


def test_chunk_takes_effect_next_tick_and_hand_over_is_jump_free():
    sp, a = _running_stage_and_push_x()
    sp.inbox = Chunk(a, sp.segment, time.time(), 1)
    sp.tick()
    sp.tick()
    assert sp.controller.p[-1][0] > 0.4  # moving one tick after arrival
    for _ in range(250):
        sp.tick()
    b = np.zeros((10, 7))
    b[:, 1] = 0.01  # a different direction: hand-over mid-segment
    sp.inbox = Chunk(b, sp.segment, time.time(), 2)
    for _ in range(600):
        sp.tick()
    p = np.array(sp.controller.p)
    v = np.diff(p, axis=0)
    assert np.abs(v).max() <= 0.5e-3 + 1e-12 and np.abs(np.diff(v, axis=0)).max() <= 4e-6 + 1e-12
    assert p[-1][1] > 0.005
    x_after_a = p[-1][0]
    # nothing covers the segments beyond the execution horizon: it glides to a stop
    for _ in range(1000):
        sp.tick()
    assert abs(sp.controller.p[-1][0] - sp.controller.p[-2][0]) < 1e-9 and sp.controller.p[-1][0] >= x_after_a


def test_sim_success_counts_only_once_it_has_held_without_a_break():
    from edge_steer.runtime.monitor import SuccessLatch
    latch = SuccessLatch(0.3)
    # an instant of "resting" (t = 0), a break, then held from t = 0.2: done at t = 0.5, not before
    seen = [latch.update(ok, t) for ok, t in [(True, 0.0), (False, 0.1), (True, 0.2), (True, 0.4), (True, 0.5)]]
    assert seen == [False, False, False, False, True]
    latch.reset()
    assert not latch.update(True, 0.6)   # a new episode starts its own count
    assert SuccessLatch(0.0).update(True, 1.0)


def test_temporal_ensemble_averages_overlapping_chunks():
    sp = _stage(ensemble=True, ensemble_decay=0.0)
    a, b = np.zeros((10, 7)), np.zeros((10, 7))
    a[:, 0], b[:, 0] = 0.01, 0.03
    sp._chunks.extend([Chunk(a, 0, 0.0, 1), Chunk(b, 1, 0.0, 2)])
    assert sp._select(1)[0] == pytest.approx(0.02)
    sp.rates = sp.rates.__class__(ensemble=False)
    assert sp._select(1)[0] == pytest.approx(0.03)


def test_latency_is_recorded_at_the_first_setpoint_a_chunk_drives_with_its_handover():
    sp, a = _running_stage_and_push_x()
    now = time.time()
    sp.inbox = Chunk(a, sp.segment, now - 0.040, 1, posted=now - 0.010)   # captured 40 ms ago, posted 10 ms ago
    sp.tick()
    t = sp.timing()
    assert 40 <= t["latency_ms_p50"] < 60 and 10 <= t["handover_ms_p50"] < 30
    sp.inbox = Chunk(a, sp.segment, now, 2)            # posted time unknown: latency only
    sp.tick()
    assert sp.latencies.n == 2 and sp.handovers.n == 1


def test_status_breaks_the_latency_down(daemon):
    d, c, e = daemon
    c.instruct("push forward")
    wait_for(lambda: c.status()["chunks"] > 3)
    s = c.status()
    c.stop()
    f2p, sl = s["frame_to_policy_ms"], s["setpoint_loop"]
    assert 0 < f2p["p50"] < 1000 and f2p["n"] >= 3
    assert 0 <= sl["handover_ms_p50"] <= sl["latency_ms_p99"] and "tick_us_p50" in sl


def test_an_estop_waiting_behind_other_requests_is_answered_first():
    """Requests that arrive while one is being handled wait on the socket; an e-stop among them is taken
    first, the rest in arrival order, each still validated and answered."""
    import threading

    import zmq

    from edge_steer.runtime.config import ZmqConfig
    from edge_steer.runtime.protocol import encode_request
    from edge_steer.runtime.server import CommandServer

    class Recorder:
        def __init__(self):
            self.order, self.first_seen, self.release = [], threading.Event(), threading.Event()

        def handle(self, req):
            self.order.append(req.cmd if req.cmd != "instruct" else f"instruct {req.args['text']}")
            if len(self.order) == 1:          # hold the first so the others queue up behind it
                self.first_seen.set()
                self.release.wait(5.0)
            return {}

    d = Recorder()
    srv = CommandServer(ZmqConfig(command=free_endpoint(), telemetry=free_endpoint()), d)
    srv.start()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(srv.cfg.command)
        s.send_multipart([b"", encode_request("status", id=0)])
        assert d.first_seen.wait(5.0)
        sent = [encode_request("status", id=1), encode_request("instruct", id=2, text="estop"),
                encode_request("estop", id=3), b"\x93garbage", encode_request("pause", id=4)]
        for m in sent:
            s.send_multipart([b"", m])
        time.sleep(0.2)                       # all five are waiting on the socket now
        d.release.set()
        ids = [msgpack.unpackb(s.recv_multipart()[-1]).get("id") for _ in range(6)]
    finally:
        s.close()
        srv.stop()
    # an instruction whose text is "estop" is only moved up, never mistaken for one
    assert d.order == ["status", "instruct estop", "estop", "status", "pause"]
    assert ids == [0, 2, 3, 1, None, 4]       # every request answered, the malformed one with an error


def test_pause_holds_the_pose_it_was_paused_at(daemon):
    """Pause re-anchors the hold at the measured pose: the arm stops where it is instead of going on to
    the last commanded target, which the impedance controller trails by millimetres (docs/serve.md,
    "Pause and e-stop"). Before, the held target was that commanded one, ahead of the arm."""
    d, c, e = daemon
    e.dx = 0.004                                       # 4 cm/s
    c.instruct("push forward")
    wait_for(lambda: c.status()["chunks"] > 8)
    time.sleep(0.3)
    before = np.array(d.robot.read().position)
    c.pause()
    after = np.array(d.robot.read().position)
    time.sleep(0.1)                                    # the stage takes the new anchor on its next tick
    held = np.array(d.setpoint.commanded[0])
    # the held target lies where the arm was while the pause was handled: on the way from `before` to `after`
    seg = after - before
    k = float(np.clip(np.dot(held - before, seg) / max(float(np.dot(seg, seg)), 1e-12), 0.0, 1.0))
    assert np.linalg.norm(held - (before + k * seg)) < 1.5e-3, (before, after, held)
    time.sleep(0.5)
    p1 = np.array(d.robot.read().position)
    time.sleep(1.0)
    assert np.linalg.norm(np.array(d.robot.read().position) - p1) < 1e-3       # and stays there
    c.stop()


def test_reset_opens_a_fresh_scene_and_a_new_instruction_starts_in_one(daemon, monkeypatch):
    """Sim: `reset` reopens the cell on the next seed, the arm back at its start; with robot.fresh_scene
    an instruction from IDLE after an episode does the same before it starts (docs/protocol.md, Sim)."""
    import dataclasses
    d, c, e = daemon
    seed0, start = c.status()["sim"]["seed"], None
    c.instruct("push forward")
    wait_for(lambda: c.status()["chunks"] > 3)
    c.stop()
    r = c.reset()
    assert r == {"state": "IDLE", "task": d.cfg.robot.task, "seed": seed0 + 1, "scene": r["scene"]}, r
    start = np.array(c.status()["tcp"][:3])
    monkeypatch.setattr(d, "machine", dataclasses.replace(d.machine, fresh_scene=True))
    c.instruct("push forward")
    wait_for(lambda: np.linalg.norm(np.array(c.status()["tcp"][:3]) - start) > 5e-3)
    c.stop()
    assert c.instruct("push forward")["state"] == "RUNNING"      # a fresh scene first, then running
    s = c.status()
    assert s["sim"]["seed"] == seed0 + 2 and s["sim"]["scene"] == r["scene"] + 1
    assert np.linalg.norm(np.array(s["tcp"][:3]) - start) < 0.1   # back near the start, not where it was pushed
    c.stop()
    with pytest.raises(ClientError, match="bad_state"):
        c.instruct("push forward")
        c.reset()                                                  # not under a running episode
    c.stop()
    monkeypatch.setattr(d, "machine", dataclasses.replace(d.machine, fresh_scene=False))


def test_a_client_from_the_doc_alone(daemon):
    """docs/protocol.md's words, pyzmq and msgpack only: DEALER and REQ framing, ids echoed in results
    and errors, each command's result shape, telemetry keys."""
    import zmq
    d, c, e = daemon
    endpoint, telemetry = d.cfg.zmq.command, d.cfg.zmq.telemetry
    ctx = zmq.Context()
    dealer, req, sub = ctx.socket(zmq.DEALER), ctx.socket(zmq.REQ), ctx.socket(zmq.SUB)
    for s in (dealer, req, sub):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 20_000)
    dealer.connect(endpoint)
    req.connect(endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"telemetry")
    sub.connect(telemetry)

    def call(cmd, rid, **fields):
        dealer.send_multipart([b"", msgpack.packb({"v": 1, "cmd": cmd, "id": rid, **fields})])
        frames = dealer.recv_multipart()
        assert len(frames) == 2 and frames[0] == b""
        reply = msgpack.unpackb(frames[1])
        assert reply["v"] == 1 and reply["id"] == rid
        return reply

    try:
        req.send(msgpack.packb({"v": 1, "cmd": "status", "id": "via-req"}))
        r = msgpack.unpackb(req.recv())
        assert r["ok"] and r["id"] == "via-req" and r["result"]["state"] == "IDLE"
        assert call("instruct", 1, text="push forward")["result"] == {"state": "RUNNING", "instruction": "push forward"}
        assert call("pause", 2)["result"] == {"state": "PAUSED"}
        assert call("start", 3)["result"] == {"state": "RUNNING"}
        assert call("stop", 4)["result"] == {"state": "IDLE"}
        assert call("estop", 5)["result"] == {"state": "FAULT", "controller": "stopped"}
        assert call("recover", 6)["result"] == {"state": "IDLE"}
        assert call("set_steering", 7, task="")["result"] == {"steering": None}
        assert call("record", 8, on=False)["result"] == {"recording": False, "dir": d.cfg.record.dir}
        for rid, msg, code in [(9, {"cmd": "fly"}, "unknown_command"), (10, {"cmd": "start", "v": 2}, "bad_version"),
                               ("eleven", {"cmd": "instruct", "text": "a\x7fb"}, "bad_field"),
                               (12, {"cmd": "instruct", "text": "x" * 70000}, "too_large")]:
            dealer.send_multipart([b"", msgpack.packb({"v": 1, "id": rid, **msg})])
            reply = msgpack.unpackb(dealer.recv_multipart()[-1])
            assert reply["ok"] is False and reply["error"] == code and reply["id"] == rid and reply["reason"], reply
        t = msgpack.unpackb(sub.recv_multipart()[-1])
        assert {"v", "seq", "t", "state", "hold", "segment", "tcp", "q", "gripper_width", "setpoint", "chunk",
                "chunks", "inference_ms", "missed_ticks"} == set(t)
    finally:
        for s in (dealer, req, sub):
            s.close()
        ctx.term()


def test_serve_sim_ships_a_steering_delta_the_default_engine_loads():
    """`serve --sim` points engine.steering_dir at the delta shipped with the embedded model, so
    `set_steering` can be tried in sim; a run directory named by its task resolves to its delta."""
    from edge_steer.runtime.commands import CommandHandlers
    from edge_steer.runtime.engine import TorchEngine

    cfg = ServeConfig.sim()
    engine = TorchEngine.load()
    loaded = []

    class Host:
        def set_steering(self, path, name):
            engine.set_steering(path)
            loaded.append(path)

    handlers = CommandHandlers(Host(), cfg.engine.steering_dir)
    assert handlers.cmd_set_steering("red_cube_in_front_of_blue_plate") == {"steering": "red_cube_in_front_of_blue_plate"}
    assert loaded[-1].name == "steering.safetensors" and engine.metadata()["steering_hash"]
    assert handlers.cmd_set_steering("") == {"steering": None} and engine.metadata()["steering_hash"] is None
