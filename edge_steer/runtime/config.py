"""`edge-steer serve` configuration: one TOML file -> typed, validated dataclasses.

Every section and key is checked at start (unknown keys, wrong types, impossible values), and the
error names the offending key, so a typo on the robot PC fails loudly instead of running with a
default. `ServeConfig.sim()` is what `serve --sim` uses when no file is given.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
import types
import typing
import warnings
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


# a steering delta of the embedded model, shipped so `serve --sim` can try `set_steering`: one run directory
# per task (docs/serve.md, "Steering in sim")
SIM_STEERING_DIR = Path(__file__).resolve().parent.parent / "assets" / "steering"


class ConfigError(ValueError):
    """A configuration the daemon refuses to start with; the message names the key."""


@dataclass(frozen=True)
class RobotConfig:
    backend: str = "sim"                 # "sim" | "panda"
    host: str = ""                       # panda: the robot's FCI address
    impedance: tuple[float, float] = (1000.0, 50.0)   # translational N/m, rotational Nm/rad
    nullspace_stiffness: float = 2.0
    grasp_force: float = 40.0            # N
    # sim only: the scene the simulated cell shows
    task: str = "red_cube_on_blue_plate"
    seed: int = 0
    stop_on_success: bool = True         # sim: RUNNING -> IDLE once the task's success predicate holds
    success_hold_s: float = 0.3          # ... without a break for this long (it is an instantaneous test)
    # sim: every episode started from IDLE after the first begins in a fresh scene, the n-th with seed
    # robot.seed + n (the `reset` command makes one at once); false: the cell stays as the last episode left it
    fresh_scene: bool = True
    # retired: SimPanda's 1 kHz loop always runs in its own process (docs/serve.md); "process" is accepted
    # with a deprecation warning, "thread" refused
    sim_loop: str = ""

    def check(self) -> None:
        _one_of("robot.backend", self.backend, ("sim", "panda"))
        _retired("robot.sim_loop", self.sim_loop, "the sim robot's 1 kHz loop as a thread of the daemon missed "
                 "7.3 % of its ticks (p99 2.45 ms) against 0.05 % (p99 141 us) in its own process")
        if self.backend == "panda" and not self.host:
            raise ConfigError("robot.host is required for the panda backend (the FCI address of the arm)")
        if min(self.impedance) <= 0:
            raise ConfigError("robot.impedance values must be > 0")
        if not 0 <= self.success_hold_s <= 10:
            raise ConfigError("robot.success_hold_s must be in [0, 10] s")
        if not 0 < self.grasp_force <= 140:
            raise ConfigError("robot.grasp_force must be in (0, 140] N")


@dataclass(frozen=True)
class CameraConfig:
    name: str = "front"                  # the observation key the model reads: observation.images.<name>
    backend: str = "sim"                 # "sim" | "realsense" | "replay"
    serial: str = ""                     # realsense: device serial ("" = the only one attached)
    width: int = 96
    height: int = 96
    fps: int = 30
    sim_camera: str = ""                 # sim: MuJoCo camera name (default: same as name)
    # sim: the software renderer's worker threads (Mesa llvmpipe's LP_NUM_THREADS). 0 renders in the
    # capture thread itself: its own workers would preempt whichever Python thread holds the GIL, and
    # the FIFO setpoint thread waits for that one (half the missed ticks, docs/serve.md); -1: Mesa's choice
    sim_render_threads: int = 0
    # replay: a dataset or `record` directory (LeRobot layout) whose observation.images.<name> frames are
    # delivered again at `fps` from a process of their own, as a RealSense delivers from its own threads
    replay_path: str = ""

    def check(self, where: str) -> None:
        _one_of(f"{where}.backend", self.backend, ("sim", "realsense", "replay"))
        if self.backend == "replay" and not self.replay_path:
            raise ConfigError(f"{where}.replay_path is required for the replay backend (a dataset or recording "
                              "directory)")
        if not self.name.isidentifier():
            raise ConfigError(f"{where}.name must be an identifier, got {self.name!r}")
        if not (16 <= self.width <= 1920 and 16 <= self.height <= 1080):
            raise ConfigError(f"{where}: resolution {self.width}x{self.height} outside 16x16..1920x1080")
        if not 1 <= self.fps <= 90:
            raise ConfigError(f"{where}.fps must be in 1..90")
        if not -1 <= self.sim_render_threads <= 64:
            raise ConfigError(f"{where}.sim_render_threads must be -1 (Mesa's choice) or 0..64")


@dataclass(frozen=True)
class EngineConfig:
    backend: str = "torch"               # torch | onnxruntime | tensorrt | cuda-graph | expert (sim: the scripted expert)
    path: str = ""                       # model / engine path ("" = the embedded default model)
    steering_dir: str = ""               # set_steering{task} loads <steering_dir>/<task>
    threads: int = 1                     # intra-op threads: leave a core to the 1 kHz side

    def check(self) -> None:
        _one_of("engine.backend", self.backend, ("torch", "onnxruntime", "tensorrt", "cuda-graph", "expert"))
        if self.threads < 1:
            raise ConfigError("engine.threads must be >= 1")


@dataclass(frozen=True)
class RatesConfig:
    control_hz: int = 1000               # setpoint stage rate
    action_hz: int = 10                  # one chunk action per 1/action_hz s (the model's training fps)
    policy_hz: float = 10.0              # inference rate (<= action_hz)
    execute_horizon: int = 5             # at most this many actions of one chunk run before a new one is needed
    ensemble: bool = False               # temporal ensembling of overlapping chunks (ACT)
    ensemble_decay: float = 0.1          # ACT's m: weight exp(-m * i), i = 0 for the oldest chunk

    def check(self) -> None:
        if not 100 <= self.control_hz <= 1000:
            raise ConfigError("rates.control_hz must be in 100..1000")
        if self.control_hz % self.action_hz:
            raise ConfigError("rates.control_hz must be a multiple of rates.action_hz")
        if not 0 < self.policy_hz <= self.action_hz:
            raise ConfigError("rates.policy_hz must be in (0, action_hz]")
        if self.execute_horizon < 1:
            raise ConfigError("rates.execute_horizon must be >= 1")
        if self.ensemble_decay < 0:
            raise ConfigError("rates.ensemble_decay must be >= 0")


@dataclass(frozen=True)
class RealtimeConfig:
    # SCHED_FIFO for the setpoint stage's 1 kHz thread, below libfranka's control thread (20) and above
    # every SCHED_OTHER thread (inference, cameras); 0 leaves it SCHED_OTHER
    priority: int = 10
    cpu: int = -1                        # pin the setpoint thread to this CPU (-1: the process's affinity)
    required: bool = False               # refuse to start without real-time scheduling (robot PC), not just warn
    # retired: the setpoint stage always runs in the robot's own process beside its 1 kHz loop, on its own
    # GIL (runtime/motion.py); "process" is accepted with a deprecation warning, "thread" refused
    motion: str = ""

    def check(self) -> None:
        _retired("realtime.motion", self.motion, "the setpoint stage as a thread of the daemon missed 506 ticks a "
                 "minute against 24 in the robot's process, robot loop p99 174 against 87 us")
        if not 0 <= self.priority <= 99:
            raise ConfigError("realtime.priority must be in 0..99 (0: no SCHED_FIFO)")
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        if self.cpu >= 0 and allowed is not None and self.cpu not in allowed:
            raise ConfigError(f"realtime.cpu {self.cpu} is not among this process's CPUs {sorted(allowed)}")
        if self.required and self.priority == 0:
            raise ConfigError("realtime.required needs realtime.priority >= 1")


@dataclass(frozen=True)
class SafetyConfig:
    workspace_min: tuple[float, float, float] = (0.20, -0.45, 0.005)   # m, base frame, TCP
    workspace_max: tuple[float, float, float] = (0.85, 0.45, 0.75)
    max_speed: float = 0.5               # m/s per axis
    max_accel: float = 4.0               # m/s^2 per axis
    max_rot_speed: float = 2.0           # rad/s
    max_rot_accel: float = 20.0          # rad/s^2
    joint_margin: float = 0.05           # rad kept from every joint limit
    joint_velocity_share: float = 0.8    # FAULT above this share of a joint's speed limit (before the reflex)
    stale_frame_ms: float = 250.0        # no fresh frame for this long -> hold
    camera_fault_ms: float = 2000.0      # ... and for this long -> FAULT
    inference_deadline_ms: float = 400.0  # a chunk older than this (frame -> ready) is dropped
    inference_stop_ms: float = 1500.0    # no usable chunk for this long while RUNNING -> FAULT

    def check(self) -> None:
        lo, hi = self.workspace_min, self.workspace_max
        if any(a >= b for a, b in zip(lo, hi)):
            raise ConfigError(f"safety.workspace_min {lo} must be below workspace_max {hi} on every axis")
        for name in ("max_speed", "max_accel", "max_rot_speed", "max_rot_accel", "stale_frame_ms",
                     "camera_fault_ms", "inference_deadline_ms", "inference_stop_ms"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"safety.{name} must be > 0")
        if self.max_speed > 1.7:
            raise ConfigError("safety.max_speed above the Panda's 1.7 m/s Cartesian limit")
        if not 0 <= self.joint_margin < 0.5:
            raise ConfigError("safety.joint_margin must be in [0, 0.5) rad")
        if not 0 < self.joint_velocity_share <= 1:
            raise ConfigError("safety.joint_velocity_share must be in (0, 1]")
        if self.camera_fault_ms < self.stale_frame_ms:
            raise ConfigError("safety.camera_fault_ms must be >= stale_frame_ms")


@dataclass(frozen=True)
class ZmqConfig:
    command: str = "tcp://127.0.0.1:5555"   # ROUTER
    telemetry: str = "tcp://127.0.0.1:5556"  # PUB
    telemetry_hz: float = 100.0
    max_message_bytes: int = 65536
    curve_secret_key: str = ""           # server certificate (zmq.auth .key_secret file); needed off localhost
    curve_authorized_keys: str = ""      # directory of client public certificates allowed to connect
    curve_operator_keys: str = ""        # directory of the clients that may move the arm (default: all allowed)

    def check(self) -> None:
        for name in ("command", "telemetry"):
            ep = getattr(self, name)
            if not ep.startswith(("tcp://", "ipc://", "inproc://")):
                raise ConfigError(f"zmq.{name} must be a tcp://, ipc:// or inproc:// endpoint, got {ep!r}")
        if not 50 <= self.telemetry_hz <= 1000:
            raise ConfigError("zmq.telemetry_hz must be in 50..1000")
        if not 1024 <= self.max_message_bytes <= 16 << 20:
            raise ConfigError("zmq.max_message_bytes must be in 1 KiB..16 MiB")
        remote = [ep for ep in (self.command, self.telemetry) if not is_local_endpoint(ep)]
        if remote and not (self.curve_secret_key and self.curve_authorized_keys):
            raise ConfigError(f"{remote[0]} is reachable from other hosts: set zmq.curve_secret_key and "
                              "zmq.curve_authorized_keys (CURVE) or bind to 127.0.0.1")
        if bool(self.curve_secret_key) != bool(self.curve_authorized_keys):
            raise ConfigError("zmq.curve_secret_key and zmq.curve_authorized_keys go together")
        if self.curve_secret_key and not Path(self.curve_secret_key).is_file():
            raise ConfigError(f"zmq.curve_secret_key: no file at {self.curve_secret_key}")
        if self.curve_secret_key and Path(self.curve_secret_key).stat().st_mode & 0o037:
            # as ssh does with private keys: a key others can read (or its group write) is not secret
            raise ConfigError(f"zmq.curve_secret_key {self.curve_secret_key} is readable by other users: "
                              "chmod 600 (or 640 for the service's group)")
        if self.curve_authorized_keys and not Path(self.curve_authorized_keys).is_dir():
            raise ConfigError(f"zmq.curve_authorized_keys: no directory at {self.curve_authorized_keys}")
        if self.curve_operator_keys and not self.curve_secret_key:
            raise ConfigError("zmq.curve_operator_keys needs CURVE (zmq.curve_secret_key and curve_authorized_keys): "
                              "without keys no client can be told apart")
        if self.curve_operator_keys and not Path(self.curve_operator_keys).is_dir():
            raise ConfigError(f"zmq.curve_operator_keys: no directory at {self.curve_operator_keys}")

    @property
    def curve(self) -> bool:
        return bool(self.curve_secret_key)


@dataclass(frozen=True)
class RecordConfig:
    dir: str = "recordings"              # LeRobot dataset written by `record on`
    image_size: int = 96                 # frames are stored at this size (the model's input size)

    def check(self) -> None:
        if not 16 <= self.image_size <= 512:
            raise ConfigError("record.image_size must be in 16..512")


@dataclass(frozen=True)
class ServeConfig:
    robot: RobotConfig = field(default_factory=RobotConfig)
    cameras: tuple[CameraConfig, ...] = (CameraConfig("front"), CameraConfig("wrist"))
    engine: EngineConfig = field(default_factory=EngineConfig)
    rates: RatesConfig = field(default_factory=RatesConfig)
    realtime: RealtimeConfig = field(default_factory=RealtimeConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    zmq: ZmqConfig = field(default_factory=ZmqConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    log_level: str = "INFO"

    def check(self) -> "ServeConfig":
        self.robot.check()
        if not self.cameras:
            raise ConfigError("at least one [[cameras]] entry is needed")
        names = [c.name for c in self.cameras]
        if len(set(names)) != len(names):
            raise ConfigError(f"camera names must be unique, got {names}")
        for i, c in enumerate(self.cameras):
            c.check(f"cameras[{i}]")
        if self.robot.backend == "panda" and any(c.backend == "sim" for c in self.cameras):
            raise ConfigError("sim cameras need the sim robot (they render its scene)")
        if self.engine.backend == "expert" and self.robot.backend != "sim":
            raise ConfigError("engine.backend 'expert' is the sim's scripted expert: it needs robot.backend 'sim'")
        for part in (self.engine, self.rates, self.realtime, self.safety, self.zmq, self.record):
            part.check()
        if self.rates.control_hz != 1000:
            raise ConfigError("the setpoint stage ticks with the robot's 1 kHz loop: rates.control_hz must be 1000")
        _one_of("log_level", self.log_level, ("DEBUG", "INFO", "WARNING", "ERROR"))
        return self

    @classmethod
    def sim(cls, **overrides: Any) -> "ServeConfig":
        """`serve --sim`: the simulated cell, two sim cameras, the default model and the steering delta
        shipped for it (SIM_STEERING_DIR, so `set_steering` can be tried), localhost sockets."""
        return replace(cls(engine=EngineConfig(steering_dir=str(SIM_STEERING_DIR))), **overrides).check()

    def with_(self, **sections: Any) -> "ServeConfig":
        """A copy with some sections' fields replaced: cfg.with_(zmq={"command": ...})."""
        out = self
        for name, changes in sections.items():
            cur = getattr(out, name)
            out = replace(out, **{name: replace(cur, **changes) if isinstance(changes, dict) else changes})
        return out.check()


def is_local_endpoint(endpoint: str) -> bool:
    if not endpoint.startswith("tcp://"):
        return True  # ipc:// and inproc:// never leave the host
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", interface names, host names: assume reachable


def load_config(path: str | Path) -> ServeConfig:
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no config file at {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p} is not valid TOML: {e}") from None
    try:
        return _build(ServeConfig, raw, "").check()
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


# ---- typed construction from plain TOML values ------------------------------------------------
def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'top level'} must be a table, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or 'top level'}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    for name, f in known.items():
        if name not in kwargs and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"missing key {where}.{name}")
    return cls(**kwargs)


def _coerce(tp, value: Any, where: str):
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):
        return _build(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be an array, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} must have {len(args)} elements, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: unsupported type")  # pragma: no cover - no unions in the schema
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


def _retired(key: str, value: str, why: str) -> None:
    """A retired switch: unset is fine, its one remaining value is accepted with a deprecation warning, the
    retired one is refused saying why (docs/serve.md has the figures)."""
    if not value:
        return
    if value == "process":
        warnings.warn(f"{key} is deprecated and ignored: 'process' is the only mode now; remove the key",
                      FutureWarning, stacklevel=3)
        return
    if value == "thread":
        raise ConfigError(f"{key} = 'thread' is retired: {why} (docs/serve.md); remove the key")
    raise ConfigError(f"{key} is retired; remove the key (got {value!r})")


def _one_of(where: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where} must be one of {list(allowed)}, got {value!r}")
