"""Cameras behind one narrow protocol, and the camera stage that keeps the latest frame of each.

Backends: `realsense` (pyrealsense2, imported only when used), `sim` (SimCamera over the sim
robot's world) and `replay` (recorded frames delivered at the camera's rate by a process of their
own). The stage runs one thread per camera; a read error (timeout, unplugged cable) is counted and
the camera is reopened, while the stale-frame watchdog decides what the arm does.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from edge_steer.runtime.config import CameraConfig

log = logging.getLogger("edge_steer.serve.camera")


class CameraError(RuntimeError):
    pass


@dataclass(frozen=True)
class Frame:
    image: np.ndarray      # uint8 H x W x 3 (RGB)
    stamp: float           # capture time, wall clock (time.time() seconds)
    number: int


@runtime_checkable
class Camera(Protocol):
    name: str

    def start(self) -> None: ...

    def read(self, timeout_ms: int) -> Frame:
        """The next new frame; raises CameraError on timeout or disconnect."""

    def stop(self) -> None: ...


class SimCameraSource:
    """A named MuJoCo camera of the sim cell through SimCamera's RealSense-like pipeline."""

    def __init__(self, cfg: CameraConfig, world):
        from edge_steer.sim.camera import SimCamera, SimConfig
        if cfg.sim_render_threads >= 0:
            # read by Mesa when this process creates its first GL context, which the capture thread does
            os.environ.setdefault("LP_NUM_THREADS", str(cfg.sim_render_threads))
        self.name = cfg.name
        self._cfg = cfg
        self.pipeline = SimCamera(world, cfg.sim_camera or cfg.name, realtime=True)
        self._sim_config = SimConfig
        self._started = False

    def start(self) -> None:
        if self._started:
            return
        conf = self._sim_config()
        conf.enable_stream("color", self._cfg.width, self._cfg.height, "rgb8", self._cfg.fps)
        self.pipeline.start(conf)
        self._started = True

    def read(self, timeout_ms: int) -> Frame:
        try:
            fs = self.pipeline.wait_for_frames(timeout_ms)
        except RuntimeError as e:
            raise CameraError(f"camera {self.name!r}: {e}") from e
        c = fs.get_color_frame()
        return Frame(c.get_data(), c.get_timestamp() / 1000.0, c.get_frame_number())

    def stop(self) -> None:
        if self._started:
            self._started = False
            self.pipeline.stop()


class RealSenseCamera:
    """An Intel RealSense colour stream via pyrealsense2 (installed with `.[robot]`)."""

    def __init__(self, cfg: CameraConfig):
        try:
            import pyrealsense2 as rs
        except ImportError as e:  # missing package, or libusb-1.0 missing under it
            raise CameraError(f"camera {cfg.name!r} needs pyrealsense2 (pip install 'edge-steer[robot]'; it "
                              f"also needs the system library libusb-1.0-0): {e}") from e
        self._rs, self._cfg, self.name = rs, cfg, cfg.name
        self._pipe = None

    def start(self) -> None:
        rs = self._rs
        conf = rs.config()
        if self._cfg.serial:
            conf.enable_device(self._cfg.serial)
        conf.enable_stream(rs.stream.color, self._cfg.width, self._cfg.height, rs.format.rgb8, self._cfg.fps)
        pipe = rs.pipeline()
        try:
            pipe.start(conf)
        except RuntimeError as e:
            raise CameraError(f"camera {self.name!r} (serial {self._cfg.serial or 'any'}): {e}") from e
        self._pipe = pipe

    def read(self, timeout_ms: int) -> Frame:
        if self._pipe is None:
            raise CameraError(f"camera {self.name!r} is not started")
        try:
            fs = self._pipe.wait_for_frames(timeout_ms)
        except RuntimeError as e:
            raise CameraError(f"camera {self.name!r}: {e}") from e
        c = fs.get_color_frame()
        domain = c.get_frame_timestamp_domain()
        rs = self._rs
        wall = domain in (rs.timestamp_domain.system_time, rs.timestamp_domain.global_time)
        stamp = c.get_timestamp() / 1000.0 if wall else time.time()  # hardware clock: arrival is the best we know
        return Frame(np.asanyarray(c.get_data()).copy(), stamp, c.get_frame_number())

    def stop(self) -> None:
        if self._pipe is not None:
            try:
                self._pipe.stop()
            finally:
                self._pipe = None


REPLAY_MAX_FRAMES = 1800   # a minute at 30 Hz; they loop
_REPLAY_MSG = struct.Struct("<qd")   # frame number, wall-clock delivery time


def _replay_clock(conn, fps: int) -> None:
    """The replay camera's own process: announce frame k at t0 + k / fps, as a RealSense's frames arrive
    from librealsense's threads whatever the daemon is doing. A frame whose time has passed by more than
    a period is dropped, as a camera drops frames nobody collected in time. Ends when the reader goes."""
    period, t0, k = 1.0 / fps, time.monotonic(), 0
    try:
        while True:
            k += 1
            wait = t0 + k * period - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            elif wait < -period:
                k += int(-wait / period)
                continue
            conn.send_bytes(_REPLAY_MSG.pack(k, time.time()))
    except (BrokenPipeError, EOFError, OSError, KeyboardInterrupt):
        pass


class ReplayCamera:
    """Frames recorded earlier (from the sim or a robot: any dataset or `record` directory with
    `observation.images.<name>`), delivered again at `fps` by a process of their own.

    The delivering process only keeps time and announces each frame over a pipe; the pixels are
    loaded once into this process's memory, as a RealSense's frames land in it by DMA. So the daemon
    sees what it would see with a real camera: frames arriving on time no matter how loaded the
    daemon's own threads are, and none of the sim cameras' software rendering on its cores."""

    def __init__(self, cfg: CameraConfig):
        self.name, self._cfg = cfg.name, cfg
        self._frames: np.ndarray | None = None
        self._conn = None
        self._proc = None

    def _load(self) -> np.ndarray:
        from edge_steer.data import Dataset, DatasetError
        key = f"observation.images.{self.name}"
        try:
            ds = Dataset(self._cfg.replay_path)
            frames = ds.sample(np.arange(min(len(ds), REPLAY_MAX_FRAMES)), chunk=1, keys=[key])[key]
        except DatasetError as e:
            raise CameraError(f"replay camera {self.name!r}: {e}") from e
        if len(frames) == 0:
            raise CameraError(f"replay camera {self.name!r}: {self._cfg.replay_path} holds no frames")
        if frames.shape[1:3] != (self._cfg.height, self._cfg.width):
            raise CameraError(f"replay camera {self.name!r}: the recorded frames are {frames.shape[2]}x"
                              f"{frames.shape[1]}, the camera is configured {self._cfg.width}x{self._cfg.height}")
        return frames

    def start(self) -> None:
        if self._proc is not None:
            return
        if self._frames is None:
            self._frames = self._load()
        ctx = mp.get_context("spawn")   # a fresh interpreter: none of the daemon's threads or locks
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_replay_clock, args=(writer, self._cfg.fps), name=f"replay-{self.name}",
                           daemon=True)
        proc.start()
        writer.close()
        self._conn, self._proc = reader, proc

    def read(self, timeout_ms: int) -> Frame:
        conn, frames = self._conn, self._frames
        if conn is None or frames is None:
            raise CameraError(f"camera {self.name!r} is not started")
        try:
            if not conn.poll(timeout_ms / 1000.0):
                raise CameraError(f"camera {self.name!r}: Frame didn't arrive within {timeout_ms}")
            msg = conn.recv_bytes()
            while conn.poll(0):   # the newest announced frame, as the stage keeps only the latest
                msg = conn.recv_bytes()
        except (EOFError, OSError) as e:
            raise CameraError(f"replay camera {self.name!r}: its delivering process ended ({e!r})") from e
        number, stamp = _REPLAY_MSG.unpack(msg)
        return Frame(frames[number % len(frames)].copy(), stamp, number)

    def stop(self) -> None:
        conn, proc, self._conn, self._proc = self._conn, self._proc, None, None
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.terminate()
            proc.join(timeout=2.0)


def open_camera(cfg: CameraConfig, world=None) -> Camera:
    if cfg.backend == "replay":
        return ReplayCamera(cfg)
    if cfg.backend == "sim":
        if world is None:
            raise CameraError(f"sim camera {cfg.name!r} needs the sim robot's world")
        return SimCameraSource(cfg, world)
    return RealSenseCamera(cfg)


class CameraStage:
    """One thread per camera keeping the newest frame; readers never block the capture."""

    def __init__(self, cameras: list[Camera], read_timeout_ms: int = 500, reopen_s: float = 0.5):
        self.cameras = cameras
        self._timeout = read_timeout_ms
        self._reopen = reopen_s
        self._latest: dict[str, Frame | None] = {c.name: None for c in cameras}
        self._arrived: dict[str, float] = {c.name: 0.0 for c in cameras}  # perf_counter of arrival
        self.errors: dict[str, int] = {c.name: 0 for c in cameras}
        self.last_error: dict[str, str] = {}
        self._cond = threading.Condition()
        self._running = False
        self._threads: list[threading.Thread] = []

    def start(self, first_frame_s: float = 10.0) -> None:
        for cam in self.cameras:
            cam.start()  # the first open fails loudly at daemon start
        self._running = True
        for cam in self.cameras:
            t = threading.Thread(target=self._loop, args=(cam,), name=f"camera-{cam.name}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.wait_fresh(after=0.0, timeout=first_frame_s) is None:  # fail at start, not at the first instruction
            missing = [n for n, f in self._latest.items() if f is None]
            self.stop()
            raise CameraError(f"no frame from camera(s) {missing} within {first_frame_s:.0f} s of starting "
                              f"({self.last_error or 'no error reported'})")

    def _loop(self, cam: Camera) -> None:
        while self._running:
            try:
                frame = cam.read(self._timeout)
            except Exception as e:  # noqa: BLE001 - a camera error must not kill the stage
                if not self._running:
                    break
                self.errors[cam.name] += 1
                self.last_error[cam.name] = str(e)
                log.warning("camera %s: %s", cam.name, e)
                if not isinstance(e, CameraError) or "didn't arrive" not in str(e):
                    self._reopen_camera(cam)
                continue
            with self._cond:
                self._latest[cam.name] = frame
                self._arrived[cam.name] = time.perf_counter()
                self._cond.notify_all()

    def _reopen_camera(self, cam: Camera) -> None:
        """Re-open until it works: first after 20 ms (a USB link that blinked is back at once, and every
        100 ms of waiting is 100 ms of holding the arm), then backing off to `reopen_s` between tries."""
        try:
            cam.stop()
        except Exception:  # noqa: BLE001 - it is already broken
            pass
        wait = min(0.02, self._reopen)
        while self._running:
            time.sleep(wait)
            try:
                cam.start()
                log.info("camera %s reopened", cam.name)
                return
            except Exception as e:  # noqa: BLE001
                self.last_error[cam.name] = str(e)
            wait = min(2 * wait, self._reopen)

    def latest(self) -> dict[str, Frame | None]:
        return dict(self._latest)

    def wait_fresh(self, after: float, timeout: float) -> dict[str, Frame] | None:
        """Frames of every camera that arrived after perf_counter time `after`, or None on timeout."""
        deadline = time.perf_counter() + timeout
        with self._cond:
            while True:
                if all(t > after for t in self._arrived.values()):
                    return dict(self._latest)  # type: ignore[arg-type]
                rem = deadline - time.perf_counter()
                if rem <= 0 or not self._running:
                    return None
                self._cond.wait(rem)

    def oldest_age(self) -> float | None:
        """Age (s) of the stalest camera's newest frame, by arrival; None before every camera delivered."""
        if any(f is None for f in self._latest.values()):
            return None
        now = time.perf_counter()
        return max(now - t for t in self._arrived.values())

    def stop(self) -> None:
        self._running = False
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=2.0)
        self._threads.clear()
        for cam in self.cameras:
            try:
                cam.stop()
            except Exception as e:  # noqa: BLE001
                log.warning("camera %s stop: %s", cam.name, e)
