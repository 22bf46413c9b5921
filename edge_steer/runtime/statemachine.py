"""The daemon's state machine, pure: a state and an event in, the next state and the effects out.

No I/O, no threads, no clock: `step` is a function of its arguments, so every rule below is
property-tested over arbitrary command sequences (tests/test_statemachine.py). The daemon applies
the effects (runtime/daemon.py) in the order given.

    IDLE --start/instruct--> RUNNING <--pause/start--> PAUSED
    RUNNING/PAUSED --stop--> IDLE               RUNNING --task_success (sim)--> IDLE
    any --estop / fault--> FAULT --recover--> IDLE

Motion: the setpoint stage drives the arm only in RUNNING (`hold_for`); every other state holds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class State(str, enum.Enum):
    IDLE = "IDLE"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    FAULT = "FAULT"


# every transition the machine may take; `step` never takes another (the property test checks it)
ALLOWED = {
    State.IDLE: {State.RUNNING, State.FAULT},
    State.RUNNING: {State.PAUSED, State.IDLE, State.FAULT},
    State.PAUSED: {State.RUNNING, State.IDLE, State.FAULT},
    State.FAULT: {State.IDLE},
}


class Event(str, enum.Enum):
    INSTRUCT = "instruct"        # text, start
    START = "start"
    PAUSE = "pause"
    STOP = "stop"
    RESET = "reset"              # sim: a fresh scene
    ESTOP = "estop"
    RECOVER = "recover"
    FAULT = "fault"              # reason: a watchdog, the robot, the engine, the 1 kHz side
    TASK_SUCCESS = "task_success"
    SHUTDOWN = "shutdown"


class Effect(str, enum.Enum):
    """What the daemon does for a step, in the order listed by the step."""
    STOP_CONTROLLER = "stop_controller"    # e-stop and robot errors: the controller goes first
    RESTART_CONTROLLER = "restart_controller"  # recover: robot error recovery, a fresh controller; if it
                                           # fails the step is not taken (FAULT stays, recover_failed)
    ABORT_EPISODE = "abort_episode"        # a recording in progress is dropped (fault)
    END_EPISODE = "end_episode"            # a recording in progress is committed (with Step.success)
    FRESH_SCENE = "fresh_scene"            # sim: a new scene, seed robot.seed + Machine.scene
    HOLD_HERE = "hold_here"                # re-anchor the hold at the measured pose (pause)
    BEGIN_EPISODE = "begin_episode"        # a new episode (number Machine.episode) starts
    RESUME_EPISODE = "resume_episode"      # the paused episode goes on


class Refused(Exception):
    """The event is not allowed in this state; nothing changed. `code` is the protocol's error code."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class Machine:
    state: State = State.IDLE
    instruction: str | None = None
    fault: str | None = None          # why FAULT was entered (None outside FAULT)
    episode: int = 0                  # episodes begun so far
    scene: int = 0                    # sim scenes made so far after the first (its seed offset)
    scene_used: bool = False          # an episode has run in the current scene
    sim: bool = False                 # a sim cell the daemon opened itself (so RESET and fresh scenes exist)
    fresh_scene: bool = False         # sim: every episode after the first starts in a fresh scene


@dataclass(frozen=True)
class Step:
    machine: Machine
    effects: tuple[Effect, ...] = ()
    why: str = ""                     # the transition's reason, when the state changed
    success: bool | None = None       # END_EPISODE's outcome (None: unknown; the daemon may ask the sim)

    @property
    def changed(self) -> bool:
        return bool(self.why)


def hold_for(state: State) -> str | None:
    """The setpoint stage's hold for a state: None (the policy drives) only while RUNNING."""
    return None if state == State.RUNNING else state.value.lower()


def step(m: Machine, event: Event, *, text: str | None = None, start: bool = True,
         reason: str = "") -> Step:
    """The next machine and the effects for `event`, or Refused (with the protocol's error code)."""
    s = m.state
    if event == Event.ESTOP or event == Event.FAULT:
        why = "estop" if event == Event.ESTOP else (reason or "fault")
        pre = (Effect.STOP_CONTROLLER,) if event == Event.ESTOP else ()
        if s == State.FAULT:
            return Step(m, pre)                      # latched: the first reason stays
        aborts = (Effect.ABORT_EPISODE,) if s in (State.RUNNING, State.PAUSED) else ()
        return _go(m, State.FAULT, why, pre + aborts, fault=why)
    if event == Event.RECOVER:
        if s != State.FAULT:
            raise Refused("bad_state", f"recover needs FAULT, state is {s.value}")
        return _go(m, State.IDLE, "recover", (Effect.RESTART_CONTROLLER,), fault=None)
    if event == Event.SHUTDOWN:
        if s in (State.RUNNING, State.PAUSED):
            return _go(m, State.IDLE, "shutdown", (Effect.END_EPISODE,))
        return Step(m)
    if s == State.FAULT:
        if event == Event.TASK_SUCCESS:
            return Step(m)                           # a late success report changes nothing in FAULT
        raise Refused("bad_state", f"in FAULT ({m.fault}): send recover first")
    if event == Event.INSTRUCT:
        if not text:
            raise Refused("bad_field", "instruct needs a text")
        changed = text != m.instruction
        m = replace(m, instruction=text)
        if s == State.RUNNING:
            if not changed:
                return Step(m)
            # a new instruction while running: the old episode ends and a new one begins in place
            m = replace(m, episode=m.episode + 1, scene_used=True)
            return Step(m, (Effect.END_EPISODE, Effect.BEGIN_EPISODE))
        if not start:
            return Step(m)
        return step(m, Event.START)
    if event == Event.START:
        if s == State.RUNNING:
            return Step(m)
        if not m.instruction:
            raise Refused("no_instruction", "send an instruction first (instruct {text})")
        if s == State.PAUSED:
            return _go(m, State.RUNNING, "resume", (Effect.RESUME_EPISODE,))
        fresh = m.sim and m.fresh_scene and m.scene_used
        effects = (Effect.FRESH_SCENE, Effect.BEGIN_EPISODE) if fresh else (Effect.BEGIN_EPISODE,)
        return _go(replace(m, episode=m.episode + 1, scene=m.scene + fresh, scene_used=True),
                   State.RUNNING, "start", effects)
    if event == Event.PAUSE:
        if s != State.RUNNING:
            raise Refused("bad_state", f"pause needs RUNNING, state is {s.value}")
        return _go(m, State.PAUSED, "pause", (Effect.HOLD_HERE,))
    if event == Event.STOP:
        if s in (State.RUNNING, State.PAUSED):
            return _go(m, State.IDLE, "stop", (Effect.END_EPISODE,))
        return Step(m)
    if event == Event.TASK_SUCCESS:
        if s != State.RUNNING:
            return Step(m)                           # paused or stopped meanwhile: nothing to end
        return replace(_go(m, State.IDLE, "task_success", (Effect.END_EPISODE,)), success=True)
    if event == Event.RESET:
        if not m.sim:
            raise Refused("not_sim", "reset makes a fresh sim scene: this daemon drives a robot or a cell it cannot reopen")
        if s != State.IDLE:
            raise Refused("bad_state", f"reset needs IDLE (stop first), state is {s.value}")
        return Step(replace(m, scene=m.scene + 1, scene_used=False), (Effect.FRESH_SCENE,))
    raise ValueError(f"unknown event {event!r}")  # pragma: no cover - Event is closed


def _go(m: Machine, new: State, why: str, effects: tuple[Effect, ...] = (), **changes) -> Step:
    if new not in ALLOWED[m.state]:  # pragma: no cover - a bug in `step`; the property test looks for it
        raise AssertionError(f"transition {m.state.value} -> {new.value} is not allowed")
    return Step(replace(m, state=new, **changes), effects, why)
