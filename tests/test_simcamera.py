"""SimCamera: a RealSense-like pipeline rendered by MuJoCo."""

import time

import numpy as np
import pytest

from edge_steer.sim.camera import SimCamera, SimConfig
from edge_steer.sim.panda import CartesianImpedance, SimPanda
from edge_steer.sim.scene import Entity, Placement, SceneSpec
from edge_steer.sim.world import World


@pytest.fixture
def world():
    return World(SceneSpec(objects=(Placement(Entity("cube", "red"), (0.5, 0.0)),)))


def test_frames_arrive_at_the_configured_rate_with_increasing_stamps(world):
    cam = SimCamera(world, "front", realtime=True)
    cfg = SimConfig()
    cfg.enable_stream("color", 64, 64, "rgb8", 15)
    cfg.enable_stream("depth", 64, 64, "z16", 15)
    cam.start(cfg)
    try:
        frames = [cam.wait_for_frames(timeout_ms=1000) for _ in range(20)]
    finally:
        cam.stop()
    numbers = [f.get_frame_number() for f in frames]
    stamps = np.array([f.get_timestamp() for f in frames])
    assert all(b > a for a, b in zip(numbers, numbers[1:]))
    assert np.all(np.diff(stamps) > 0)
    assert np.mean(np.diff(stamps)) == pytest.approx(1000 / 15, rel=0.25)
    color, depth = frames[-1].get_color_frame(), frames[-1].get_depth_frame()
    img = color.get_data()
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and img.std() > 5
    assert depth.get_data().dtype == np.uint16
    assert 0.3 < depth.get_distance(32, 32) < 3.0  # the table, in metres


def test_poll_returns_none_when_nothing_new(world):
    cam = SimCamera(world, "wrist", realtime=True)
    cam.start()
    try:
        cam.wait_for_frames(1000)
        assert cam.poll_for_frames() is None
        time.sleep(0.1)
        assert cam.poll_for_frames() is not None
    finally:
        cam.stop()


def test_stalled_stream_times_out_with_librealsense_wording(world):
    cam = SimCamera(world, "front", realtime=True)
    cam.start()
    try:
        cam.wait_for_frames(1000)
        cam.stalled = True
        time.sleep(0.1)
        cam.poll_for_frames()  # a frame captured just before the stall is still due
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match="didn't arrive within 200"):
            cam.wait_for_frames(timeout_ms=200)
        assert 0.15 < time.perf_counter() - t0 < 1.0
        cam.stalled = False
        assert cam.wait_for_frames(1000) is not None  # the stream recovers
    finally:
        cam.stop()


@pytest.mark.parametrize("stream,kw", [
    ("infrared", {}), ("color", {"format": "bgr8"}), ("color", {"framerate": 500}), ("depth", {"width": 4}),
])
def test_bad_stream_config_raises(stream, kw):
    with pytest.raises(ValueError):
        SimConfig().enable_stream(stream, **kw)


def test_pipeline_lifecycle_errors(world):
    with pytest.raises(ValueError, match="no camera"):
        SimCamera(world, "ceiling")
    cam = SimCamera(world, "front", realtime=False)
    with pytest.raises(RuntimeError):
        cam.wait_for_frames(100)
    with pytest.raises(RuntimeError):
        cam.stop()
    cam.start()
    with pytest.raises(RuntimeError):
        cam.start()
    cam.stop()


def test_on_demand_frames_follow_sim_time_and_the_arm(world):
    with SimPanda(world, realtime=False) as robot:
        front, wrist = SimCamera(world, "front", realtime=False), SimCamera(world, "wrist", realtime=False)
        front.start()
        wrist.start()
        f0, w0 = front.wait_for_frames(), wrist.wait_for_frames()
        assert f0.get_timestamp() == pytest.approx(world.time * 1000)
        assert not np.array_equal(f0.get_color_frame().get_data(), w0.get_color_frame().get_data())
        ctrl = CartesianImpedance()
        robot.start_controller(ctrl)
        ctrl.set_control(robot.get_position() + [0.1, 0.1, -0.1], robot.get_orientation())
        robot.step_until(world.time + 1.0)
        f1 = front.wait_for_frames()
        assert f1.get_timestamp() == pytest.approx(f0.get_timestamp() + 1000, abs=2)
        assert np.abs(f1.get_color_frame().get_data().astype(int) - f0.get_color_frame().get_data()).mean() > 0.5
        front.stop()
        wrist.stop()
