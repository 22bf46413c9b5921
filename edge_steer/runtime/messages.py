"""What crosses between the daemon and the robot's process over its socket, as dataclasses (pickled by
multiprocessing's Connection): the parent's Hello and the child's answer to it, then requests, each in an
Envelope with its number, and their Replies. State and targets do not come this way: they are in the
shared file (runtime/shm.py), read and written at 1 kHz without a syscall.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


# ---- start: the backends (Hello.backend) ---------------------------------------------------------
@dataclass(frozen=True)
class PandaBackend:
    """The arm (runtime/panda_process.py): `connect` is the `module:function` that opens it."""
    host: str
    enforce_realtime: bool = False
    grasp_force: float = 20.0
    connect: str = "edge_steer.runtime.panda_process:connect_panda_py"


@dataclass(frozen=True)
class SimBackend:
    """The sim twin's world (sim/panda_process.py)."""
    spec: Any                      # sim.scene.SceneSpec
    q0: Any
    finger: float = 0.04
    grasp_force: float = 20.0


# ---- start --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MotionSpec:
    """Run the setpoint stage in the child (runtime/motion.py) with these settings. `q_nullspace`: the
    impedance controller's nullspace target (None: the arm's joints at start)."""
    rates: Any                     # RatesConfig
    safety: Any                    # SafetyConfig
    q_nullspace: Any = None


@dataclass(frozen=True)
class Hello:
    """The parent's first message: how to open the backend, and how to run the loop. `hooks`:
    `module:function`s called with the child once it is ready (test instrumentation, never production)."""
    backend: Any                   # the backend's own dataclass (SimBackend, PandaBackend)
    rt_priority: int
    cpu: int
    period: float = 0.001
    motion: MotionSpec | None = None
    hooks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ready:
    rt_refused: str | None         # why the loop is not SCHED_FIFO, if it is not


@dataclass(frozen=True)
class Failed:
    reason: str


# ---- requests -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StartController:
    kind: str                      # "cartesian" | "joint"
    params: dict
    gen: float                     # the parent's controller generation: targets of older ones are ignored


@dataclass(frozen=True)
class Recover:
    pass


@dataclass(frozen=True)
class StopError:
    """Why the last stop (done through the shared stop slot) raised."""


@dataclass(frozen=True)
class Timing:
    pass


@dataclass(frozen=True)
class ResetTiming:
    pass


@dataclass(frozen=True)
class Close:
    pass


@dataclass(frozen=True)
class Gripper:
    """Open or close through the child's gripper driver."""
    close: bool
    one_way: ClassVar[bool] = True     # the stage sends it from its 1 kHz tick: a reply would hold that tick


@dataclass(frozen=True)
class MotionReset:
    p: list[float]
    q: list[float]


@dataclass(frozen=True)
class MotionTiming:
    pass


@dataclass(frozen=True)
class MotionClearTiming:
    pass


@dataclass(frozen=True)
class Envelope:
    rid: int                       # 0: one-way, nobody waits for the reply
    body: Any


@dataclass(frozen=True)
class Reply:
    rid: int
    value: Any = None
    error: tuple[str, str] | None = field(default=None)   # (exception type name, message)
