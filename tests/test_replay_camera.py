"""The replay camera: recorded frames delivered at the camera's rate by a process of their own, so they
keep arriving on time while the reading process is busy, through the same protocol and camera stage
as the sim and RealSense backends."""

import os
import time
from dataclasses import replace

import numpy as np
import pytest

from edge_steer.data import DatasetWriter, default_spec
from edge_steer.runtime.camera import Camera, CameraError, CameraStage, ReplayCamera, open_camera
from edge_steer.runtime.config import CameraConfig, ConfigError, ServeConfig

N = 12


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """Frame i of every camera is filled with the value 10 * i, so a delivered frame names itself."""
    root = tmp_path_factory.mktemp("replay") / "rec"
    with DatasetWriter(root, default_spec(image_size=32)) as w:
        w.begin_episode()
        for i in range(N):
            img = np.full((32, 32, 3), 10 * i, np.uint8)
            w.add_frame({"observation.images.front": img, "observation.images.wrist": img,
                         "observation.state": np.zeros(8), "observation.joints": np.zeros(7),
                         "action": np.zeros(7)}, task="replay")
        w.end_episode(success=True)
    return root


def _cfg(recording, **kw) -> CameraConfig:
    return CameraConfig("front", backend="replay", width=32, height=32, fps=30, replay_path=str(recording), **kw)


def test_frames_arrive_at_the_camera_rate_from_another_process(recording):
    cam = open_camera(_cfg(recording))
    assert isinstance(cam, ReplayCamera) and isinstance(cam, Camera)
    cam.start()
    try:
        assert cam._proc.pid != os.getpid() and cam._proc.is_alive()
        frames = [cam.read(2000) for _ in range(16)]
        numbers = [f.number for f in frames]
        assert numbers == sorted(numbers) and len(set(numbers)) == 16
        for f in frames:   # the recorded pixels, looping over the recording
            assert f.image.shape == (32, 32, 3) and np.all(f.image == 10 * (f.number % N))
        gaps = np.diff([f.stamp for f in frames]) / np.maximum(1, np.diff(numbers))
        assert 0.02 < float(np.median(gaps)) < 0.05          # 30 Hz
        # this process busy (holding its GIL) for 0.3 s: the frames kept coming on time meanwhile
        last = cam.read(2000)
        t = time.perf_counter()
        while time.perf_counter() - t < 0.3:
            pass
        newest = cam.read(2000)
        assert newest.number - last.number >= 6 and time.time() - newest.stamp < 0.1
    finally:
        cam.stop()
    assert cam._proc is None
    with pytest.raises(CameraError, match="not started"):
        cam.read(10)


def test_camera_stage_reads_replayed_frames_and_survives_a_killed_delivery(recording):
    cams = [open_camera(_cfg(recording)), open_camera(replace(_cfg(recording), name="wrist"))]
    stage = CameraStage(cams, read_timeout_ms=200, reopen_s=0.05)
    stage.start(first_frame_s=10.0)
    try:
        assert stage.wait_fresh(after=time.perf_counter(), timeout=2.0) is not None
        cams[0]._proc.kill()   # the delivering process dies: the stage reopens the camera
        deadline = time.time() + 10
        while stage.errors["front"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert stage.errors["front"] >= 1
        assert stage.wait_fresh(after=time.perf_counter(), timeout=5.0) is not None
    finally:
        stage.stop()


def test_replay_is_configured_and_refused_clearly(recording, tmp_path):
    with pytest.raises(ConfigError, match="replay_path is required"):
        CameraConfig("front", backend="replay").check("cameras[0]")
    cfg = ServeConfig.sim().with_(cameras=(_cfg(recording), replace(_cfg(recording), name="wrist")))
    assert [c.backend for c in cfg.cameras] == ["replay", "replay"]
    with pytest.raises(CameraError, match="the recorded frames are 32x32, the camera is configured 96x96"):
        ReplayCamera(replace(_cfg(recording), width=96, height=96)).start()
    with pytest.raises(CameraError, match="does not exist"):
        ReplayCamera(replace(_cfg(recording), replay_path=str(tmp_path / "nothing"))).start()
    with pytest.raises(CameraError, match="unknown feature 'observation.images.side'"):
        ReplayCamera(replace(_cfg(recording), name="side")).start()
