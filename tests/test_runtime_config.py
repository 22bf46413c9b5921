"""Serve configuration and the command protocol's decoder: every bad input gets a clear reason."""

from __future__ import annotations

import os

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_steer.runtime.config import ConfigError, ServeConfig, is_local_endpoint, load_config
from edge_steer.runtime.protocol import SCHEMA, ProtocolError, decode_request, encode_request

GOOD = """
log_level = "INFO"
[robot]
backend = "panda"
host = "172.16.0.2"
[[cameras]]
name = "front"
backend = "realsense"
serial = "123456"
width = 640
height = 480
fps = 30
[engine]
backend = "onnxruntime"
path = "/opt/edge-steer/engine.onnx"
[rates]
policy_hz = 5
ensemble = true
[safety]
workspace_min = [0.3, -0.3, 0.02]
workspace_max = [0.7, 0.3, 0.5]
max_speed = 0.3
[zmq]
command = "tcp://127.0.0.1:6000"
"""


def test_sim_defaults_are_valid_and_local():
    cfg = ServeConfig.sim()
    assert cfg.robot.backend == "sim" and [c.name for c in cfg.cameras] == ["front", "wrist"]
    assert is_local_endpoint(cfg.zmq.command) and is_local_endpoint(cfg.zmq.telemetry)


def test_toml_file_round_trip(tmp_path):
    p = tmp_path / "serve.toml"
    p.write_text(GOOD)
    cfg = load_config(p)
    assert cfg.robot.host == "172.16.0.2" and cfg.cameras[0].serial == "123456"
    assert cfg.rates.policy_hz == 5.0 and cfg.rates.ensemble is True
    assert cfg.safety.workspace_min == (0.3, -0.3, 0.02) and cfg.zmq.command.endswith(":6000")


@pytest.mark.parametrize("edit, message", [
    ("[robot]\nbakend = 'sim'\n", "unknown key"),
    ("[rates]\npolicy_hz = 'fast'\n", "rates.policy_hz must be a number"),
    ("[rates]\nexecute_horizon = 1.5\n", "must be an integer"),
    ("[safety]\nworkspace_min = [1.0, 0.0, 0.0]\nworkspace_max = [0.5, 1.0, 1.0]\n", "below workspace_max"),
    ("[safety]\nworkspace_min = [0.1, 0.0]\n", "must have 3 elements"),
    ("[robot]\nbackend = 'panda'\n[[cameras]]\nname = 'front'\nbackend = 'realsense'\n", "robot.host is required"),
    ("[zmq]\ncommand = 'tcp://0.0.0.0:5555'\n", "CURVE"),
    ("[zmq]\ntelemetry = 'tcp://*:5556'\n", "CURVE"),
    ("[zmq]\ntelemetry_hz = 10\n", "telemetry_hz"),
    ("[robot]\nsuccess_hold_s = -0.1\n", "robot.success_hold_s"),
    ("[engine]\nbackend = 'magic'\n", "engine.backend must be one of"),
    ("[[cameras]]\nname = 'a'\n[[cameras]]\nname = 'a'\n", "unique"),
    ("robot = 3\n", "must be a table"),
    ("this is not toml", "not valid TOML"),
])
def test_bad_configs_name_the_key(tmp_path, edit, message):
    p = tmp_path / "bad.toml"
    p.write_text(edit)
    with pytest.raises(ConfigError, match=message):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no config file"):
        load_config(tmp_path / "nope.toml")


# ---- protocol ------------------------------------------------------------------------------------
def _code(data: bytes, limit: int = 65536) -> str:
    with pytest.raises(ProtocolError) as e:
        decode_request(data, limit)
    return e.value.code


def test_every_command_decodes():
    args = {"instruct": {"text": "put the red cube on the blue plate"}, "record": {"on": True},
            "set_steering": {"task": "red_cube_in_front_of_blue_plate"}}
    for cmd in SCHEMA:
        req = decode_request(encode_request(cmd, id=7, **args.get(cmd, {})), 65536)
        assert req.cmd == cmd and req.id == 7


@pytest.mark.parametrize("msg, code", [
    (b"\xc1garbage", "malformed"),
    (msgpack.packb([1, 2, 3]), "malformed"),
    (msgpack.packb({"cmd": "status"}), "bad_version"),
    (msgpack.packb({"v": 2, "cmd": "status"}), "bad_version"),
    (msgpack.packb({"v": 1, "cmd": "dance"}), "unknown_command"),
    (msgpack.packb({"v": 1, "cmd": 5}), "bad_field"),
    (msgpack.packb({"v": 1, "cmd": "instruct"}), "bad_field"),
    (msgpack.packb({"v": 1, "cmd": "instruct", "text": 42}), "bad_field"),
    (msgpack.packb({"v": 1, "cmd": "instruct", "text": "   "}), "bad_field"),
    (msgpack.packb({"v": 1, "cmd": "instruct", "text": "a\x00b"}), "bad_field"),
    (msgpack.packb({"v": 1, "cmd": "instruct", "text": "x" * 5000}), "bad_field"),
    (msgpack.packb({"v": 1, "cmd": "record", "on": "yes"}), "bad_field"),
    (msgpack.packb({"v": 1, "cmd": "record", "on": 1}), "bad_field"),
    (msgpack.packb({"v": 1, "cmd": "start", "speed": 9}), "bad_field"),
    (msgpack.packb({"v": 1, "cmd": "status", "id": [1]}), "bad_field"),
    (msgpack.packb({"v": 1, "cmd": "status"}) + b"\x01", "malformed"),
])
def test_bad_requests_get_a_code(msg, code):
    assert _code(msg) == code


def test_oversized_request():
    assert _code(encode_request("instruct", text="x" * 900), limit=512) == "too_large"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_raise_protocol_errors(data):
    try:
        decode_request(data, 4096)
    except ProtocolError:
        pass


def test_the_documented_example_config_is_valid():
    from pathlib import Path
    cfg = load_config(Path(__file__).parent.parent / "docs" / "serve.example.toml")
    assert cfg.robot.backend == "panda" and len(cfg.cameras) == 2


def test_sim_cameras_render_in_their_own_thread_unless_told_otherwise(monkeypatch):
    from dataclasses import replace

    from edge_steer.runtime.camera import SimCameraSource
    from edge_steer.runtime.config import CameraConfig
    from edge_steer.sim.scene import SceneSpec
    from edge_steer.sim.world import World

    with pytest.raises(ConfigError, match="sim_render_threads"):
        ServeConfig.sim().with_(cameras=(CameraConfig("front", sim_render_threads=-2),))
    world = World(SceneSpec(objects=()))
    monkeypatch.delenv("LP_NUM_THREADS", raising=False)
    SimCameraSource(replace(CameraConfig("front"), sim_render_threads=-1), world)
    assert "LP_NUM_THREADS" not in os.environ                  # -1: Mesa's own choice
    SimCameraSource(CameraConfig("front"), world)
    assert os.environ["LP_NUM_THREADS"] == "0"                 # the default: no renderer worker threads
    monkeypatch.setenv("LP_NUM_THREADS", "3")
    SimCameraSource(CameraConfig("front"), world)
    assert os.environ["LP_NUM_THREADS"] == "3"                 # an operator's own setting wins


class _Unpluggable:
    """A camera whose cable is out for the first `out_s` seconds after its first read error."""

    def __init__(self, out_s: float):
        import time
        self.name, self.out_s, self.starts, self._time = "cam", out_s, [], time
        self._pulled_at: float | None = None
        self.n = 0

    def _out(self) -> bool:
        return self._pulled_at is not None and self._time.perf_counter() - self._pulled_at < self.out_s

    def start(self) -> None:
        from edge_steer.runtime.camera import CameraError
        self.starts.append(self._time.perf_counter())
        if self._out():
            raise CameraError("No device connected")

    def read(self, timeout_ms: int):
        import numpy as np

        from edge_steer.runtime.camera import CameraError, Frame
        self._time.sleep(0.01)
        self.n += 1
        if self.n == 20 and self._pulled_at is None:
            self._pulled_at = self._time.perf_counter()
        if self._out() or self.n == 20:
            raise CameraError("device disconnected")
        return Frame(np.zeros((4, 4, 3), np.uint8), self._time.time(), self.n)

    def stop(self) -> None:
        pass


@pytest.mark.parametrize("out_s", [0.0, 0.5])
def test_a_camera_that_drops_out_is_retried_at_once_then_with_backoff(out_s):
    import time

    from edge_steer.runtime.camera import CameraStage
    cam = _Unpluggable(out_s)
    stage = CameraStage([cam], reopen_s=0.4)
    stage.start()
    try:
        deadline = time.perf_counter() + 5
        while stage.latest()["cam"] is None or stage.latest()["cam"].number <= 20:  # 20: the read that failed
            assert time.perf_counter() < deadline, "frames did not come back"
            time.sleep(0.01)
        assert stage.errors["cam"] >= 1
    finally:
        stage.stop()
    gaps = [b - a for a, b in zip(cam.starts[1:], cam.starts[2:])]  # starts[0]: the daemon's own open
    if out_s == 0.0:
        # a blink: the first retry works; it must not wait the full reopen_s as a fixed pause would
        assert len(cam.starts) == 2 and cam.starts[1] - cam._pulled_at < 0.2
    else:
        # out for 0.5 s: a handful of tries whose gaps grow, not a hot loop and not reopen_s each
        assert 4 <= len(cam.starts) <= 10, cam.starts
        assert all(g2 >= g1 * 0.9 for g1, g2 in zip(gaps, gaps[1:])), gaps
        assert max(gaps) <= 0.4 + 0.1


def test_the_stage_runs_in_the_robot_process_on_either_backend(tmp_path):
    p = tmp_path / "serve.toml"
    p.write_text(GOOD + "[realtime]\nmotion = 'process'\n")
    with pytest.warns(FutureWarning, match="realtime.motion is deprecated"):
        cfg = load_config(p)
    assert cfg.robot.backend == "panda"
    p.write_text(GOOD.replace("policy_hz = 5", "policy_hz = 5\ncontrol_hz = 500"))
    with pytest.raises(ConfigError, match="control_hz must be 1000"):
        load_config(p)
