"""`SimCamera`: a RealSense-like pipeline over MuJoCo's offscreen renderer.

The surface mirrors pyrealsense2's: `SimConfig.enable_stream(stream, width, height, format,
framerate)`, `pipeline.start(config)`, `wait_for_frames(timeout_ms)` -> a frameset with
`get_color_frame()` / `get_depth_frame()`, each with `get_data()`, `get_frame_number()` and
`get_timestamp()` (milliseconds), and `stop()`. A timeout raises RuntimeError with librealsense's
wording, so callers handle both backends the same way.

With a realtime `SimPanda` a capture thread renders at the configured frame rate on the wall clock;
otherwise frames are rendered on demand at the current sim time. MuJoCo's GL context belongs to the
thread that made it, so each thread renders through its own `SceneRenderer`.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

import mujoco

from edge_steer.sim.world import World


def _use_requested_gl_backend() -> None:
    """Honour MUJOCO_GL=egl even when `mujoco` was imported before `edge_steer.sim` set it.

    MuJoCo picks its GL backend when it is first imported; a process that imported `mujoco` first
    (a script, a test module) got GLFW, which cannot make a context on a headless machine (and a
    second attempt after that failure hangs inside MuJoCo while holding the GIL).
    """
    if os.environ.get("MUJOCO_GL", "").lower().strip() != "egl":
        return
    from mujoco.rendering.classic import gl_context
    current = getattr(gl_context, "GLContext", None)
    if current is not None and getattr(current, "__module__", "").startswith("mujoco.egl"):
        return
    try:
        from mujoco.egl import GLContext as EGLContext
    except ImportError:  # no EGL here: keep what MuJoCo chose
        return
    gl_context.GLContext = EGLContext


class SceneRenderer:
    """Renders named cameras of a `World` (RGB uint8, depth metres). One per thread."""

    def __init__(self, world: World, width: int, height: int):
        _use_requested_gl_backend()
        self.world = world
        self.width, self.height = width, height
        self._r = mujoco.Renderer(world.model, height=height, width=width)

    def rgb(self, camera: str) -> np.ndarray:
        with self.world.lock:
            self._r.update_scene(self.world.data, camera=camera)
        return self._r.render().copy()

    def depth(self, camera: str) -> np.ndarray:
        with self.world.lock:
            self._r.update_scene(self.world.data, camera=camera)
        self._r.enable_depth_rendering()
        try:
            return self._r.render().copy()
        finally:
            self._r.disable_depth_rendering()

    def close(self) -> None:
        self._r.close()


@dataclass(frozen=True)
class StreamProfile:
    stream: str          # "color" | "depth"
    width: int
    height: int
    format: str          # "rgb8" | "z16"
    framerate: int


class SimConfig:
    """rs.config: which streams to enable."""

    def __init__(self):
        self.streams: dict[str, StreamProfile] = {}

    def enable_stream(self, stream: str, width: int = 128, height: int = 128, format: str | None = None,
                      framerate: int = 30) -> None:
        if stream not in ("color", "depth"):
            raise ValueError(f"unsupported stream {stream!r}; SimCamera offers 'color' and 'depth'")
        fmt = format or ("rgb8" if stream == "color" else "z16")
        if (stream, fmt) not in (("color", "rgb8"), ("depth", "z16")):
            raise ValueError(f"unsupported format {fmt!r} for {stream} stream")
        if not (16 <= width <= 1280 and 16 <= height <= 960):
            raise ValueError(f"resolution {width}x{height} outside 16x16..1280x960")
        if not 1 <= framerate <= 90:
            raise ValueError(f"framerate {framerate} outside 1..90 Hz")
        self.streams[stream] = StreamProfile(stream, width, height, fmt, framerate)


class SimFrame:
    def __init__(self, data: np.ndarray, number: int, timestamp_ms: float, profile: StreamProfile):
        self._data, self._number, self._ts, self._profile = data, number, timestamp_ms, profile

    def get_data(self) -> np.ndarray:
        return self._data

    def get_frame_number(self) -> int:
        return self._number

    def get_timestamp(self) -> float:
        return self._ts

    def get_width(self) -> int:
        return self._profile.width

    def get_height(self) -> int:
        return self._profile.height

    def get_profile(self) -> StreamProfile:
        return self._profile

    def get_distance(self, x: int, y: int) -> float:
        if self._profile.stream != "depth":
            raise RuntimeError("get_distance is only defined for depth frames")
        return float(self._data[y, x]) * 0.001


class SimFrameSet:
    def __init__(self, frames: dict[str, SimFrame]):
        self._frames = frames

    def get_color_frame(self) -> SimFrame | None:
        return self._frames.get("color")

    def get_depth_frame(self) -> SimFrame | None:
        return self._frames.get("depth")

    def get_frame_number(self) -> int:
        return next(iter(self._frames.values())).get_frame_number()

    def get_timestamp(self) -> float:
        return next(iter(self._frames.values())).get_timestamp()


class SimCamera:
    """rs.pipeline for one named MuJoCo camera ('front' or 'wrist')."""

    def __init__(self, world: World, camera: str = "front", realtime: bool = True):
        if mujoco.mj_name2id(world.model, mujoco.mjtObj.mjOBJ_CAMERA, camera) < 0:
            raise ValueError(f"no camera named {camera!r} in the scene")
        self.world, self.camera, self.realtime = world, camera, realtime
        self._config: SimConfig | None = None
        self._latest: SimFrameSet | None = None
        self._returned = -1
        self._number = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self._renderer: SceneRenderer | None = None
        self._error: BaseException | None = None  # why the capture thread died, if it did
        self.stalled = False  # fault injection: the stream stops delivering while True

    def start(self, config: SimConfig | None = None) -> SimConfig:
        if self._running or self._config is not None:
            raise RuntimeError("pipeline already started")
        if config is None:
            config = SimConfig()
            config.enable_stream("color", 128, 128, "rgb8", 30)
        if not config.streams:
            raise ValueError("config enables no stream")
        sizes = {(s.width, s.height) for s in config.streams.values()}
        rates = {s.framerate for s in config.streams.values()}
        if len(sizes) > 1 or len(rates) > 1:
            raise ValueError("SimCamera streams must share resolution and frame rate")
        (width, height), = sizes
        vis = self.world.model.vis.global_
        if width > vis.offwidth or height > vis.offheight:
            raise ValueError(f"resolution {width}x{height} exceeds the scene's offscreen framebuffer "
                             f"{vis.offwidth}x{vis.offheight}")
        self._config = config
        self._latest, self._returned, self._error = None, -1, None  # nothing from a previous run is due
        if self.realtime:
            self._running = True
            self._thread = threading.Thread(target=self._capture_loop, name=f"simcam-{self.camera}", daemon=True)
            self._thread.start()
        return config

    def _profile(self) -> StreamProfile:
        assert self._config is not None
        return next(iter(self._config.streams.values()))

    def _render(self, renderer: SceneRenderer, stamp_ms: float) -> SimFrameSet:
        assert self._config is not None
        self._number += 1
        frames = {}
        for name, prof in self._config.streams.items():
            if name == "color":
                data = renderer.rgb(self.camera)
            else:
                data = np.clip(renderer.depth(self.camera) * 1000.0, 0, 65535).astype(np.uint16)
            frames[name] = SimFrame(data, self._number, stamp_ms, prof)
        return SimFrameSet(frames)

    def _capture_loop(self) -> None:
        try:
            self._capture()
        except BaseException as e:  # surface it in wait_for_frames instead of a silent timeout
            with self._cond:
                self._error = e
                self._running = False
                self._cond.notify_all()

    def _capture(self) -> None:
        prof = self._profile()
        renderer = SceneRenderer(self.world, prof.width, prof.height)
        period = 1.0 / prof.framerate
        # capture on a grid shared by every camera of the same rate, as RealSense inter-camera
        # hardware sync does: the front and wrist frames of one instant are taken together, so a
        # policy needing both does not wait up to a frame period for the second one
        def wait_for_grid() -> float:
            t = math.ceil(time.perf_counter() / period) * period
            time.sleep(max(0.0, t - time.perf_counter()))
            return t
        next_t = wait_for_grid()
        try:
            while self._running:
                if not self.stalled:
                    fs = self._render(renderer, time.time() * 1000.0)
                    with self._cond:
                        self._latest = fs
                        self._cond.notify_all()
                next_t += period
                delay = next_t - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                else:   # rendering is slower than the rate: drop to the next grid point, don't queue
                    next_t = wait_for_grid()
        finally:
            renderer.close()

    def wait_for_frames(self, timeout_ms: int = 5000) -> SimFrameSet:
        if self._config is None:
            raise RuntimeError("wait_for_frames cannot be called before start()")
        if not self.realtime:
            if self.stalled:
                raise RuntimeError(f"Frame didn't arrive within {timeout_ms}")
            if self._renderer is None:
                prof = self._profile()
                self._renderer = SceneRenderer(self.world, prof.width, prof.height)
            return self._render(self._renderer, self.world.time * 1000.0)
        deadline = time.perf_counter() + timeout_ms / 1000.0
        with self._cond:
            while self._latest is None or self._latest.get_frame_number() == self._returned:
                if self._error is not None:
                    raise RuntimeError(f"SimCamera {self.camera!r} capture thread failed: {self._error!r}") \
                        from self._error
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not self._running:
                    raise RuntimeError(f"Frame didn't arrive within {timeout_ms}")
                self._cond.wait(remaining)
            self._returned = self._latest.get_frame_number()
            return self._latest

    def poll_for_frames(self) -> SimFrameSet | None:
        with self._cond:
            if self._latest is None or self._latest.get_frame_number() == self._returned:
                return None
            self._returned = self._latest.get_frame_number()
            return self._latest

    def stop(self) -> None:
        if self._config is None:
            raise RuntimeError("stop() called on a pipeline that was not started")
        self._running = False
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self._config = None
