"""The daemon's state machine (runtime/statemachine.py), pure: property-tested over arbitrary event
sequences, plus the rules a reader of docs/protocol.md relies on, one example each."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_steer.runtime.statemachine import ALLOWED, Effect, Event, Machine, Refused, State, hold_for, step

# docs/protocol.md, "State machine", written out here so that a change to the module's own table fails
DOCUMENTED = {
    State.IDLE: {State.RUNNING, State.FAULT},
    State.RUNNING: {State.PAUSED, State.IDLE, State.FAULT},
    State.PAUSED: {State.RUNNING, State.IDLE, State.FAULT},
    State.FAULT: {State.IDLE},
}

TEXTS = st.sampled_from(["push the cube", "stack it", ""])
EVENTS = st.one_of(
    st.tuples(st.just(Event.INSTRUCT), st.fixed_dictionaries({"text": TEXTS, "start": st.booleans()})),
    st.tuples(st.sampled_from([e for e in Event if e not in (Event.INSTRUCT, Event.FAULT)]), st.just({})),
    st.tuples(st.just(Event.FAULT), st.fixed_dictionaries({"reason": st.sampled_from(["camera_stale", "engine"])})),
)
MACHINES = st.builds(Machine, sim=st.booleans(), fresh_scene=st.booleans())


def run(m: Machine, events):
    """Every step taken (machine before, event, step) and every refusal (machine before, event)."""
    taken, refused = [], []
    for event, kw in events:
        try:
            s = step(m, event, **kw)
        except Refused as e:
            assert e.code and e.reason
            refused.append((m, event, e.code))
            continue
        taken.append((m, event, kw, s))
        m = s.machine
    return taken, refused


@settings(max_examples=400, deadline=None)
@given(MACHINES, st.lists(EVENTS, max_size=40))
def test_no_transition_outside_the_table_is_ever_taken(m0, events):
    taken, _ = run(m0, events)
    for before, event, _, s in taken:
        a, b = before.state, s.machine.state
        assert (a == b) or b in DOCUMENTED[a], (a, event, b)
        # a step whose state does not change says no reason; one that does always says why
        assert bool(s.why) == (a != b)


@settings(max_examples=400, deadline=None)
@given(MACHINES, st.lists(EVENTS, max_size=40))
def test_after_estop_or_fault_nothing_moves_until_recover(m0, events):
    """Once FAULT is entered, every later step stays in FAULT and holds, until a recover is taken (and a
    recover is taken only with a controller restart); start and instruct are refused meanwhile."""
    taken, refused = run(m0, events)
    for before, event, _, s in taken:
        if before.state == State.FAULT and event != Event.RECOVER:
            assert s.machine.state == State.FAULT and hold_for(s.machine.state) is not None
            assert Effect.BEGIN_EPISODE not in s.effects and Effect.FRESH_SCENE not in s.effects
        if event == Event.ESTOP:
            assert s.machine.state == State.FAULT and Effect.STOP_CONTROLLER in s.effects
        if event == Event.RECOVER:
            assert before.state == State.FAULT and s.effects == (Effect.RESTART_CONTROLLER,)
    for before, event, code in refused:
        if before.state == State.FAULT and event in (Event.START, Event.INSTRUCT, Event.PAUSE, Event.RESET):
            assert code in ("bad_state", "bad_field", "not_sim")


@settings(max_examples=400, deadline=None)
@given(MACHINES, st.lists(EVENTS, max_size=40))
def test_only_running_drives_and_episodes_open_and_close_in_pairs(m0, events):
    """The arm is driven only in RUNNING; an episode is open exactly while RUNNING or PAUSED: every
    BEGIN comes with a fresh episode number, and every way out of RUNNING/PAUSED ends or aborts it."""
    taken, _ = run(m0, events)
    open_ = False
    for before, event, _, s in taken:
        assert (hold_for(s.machine.state) is None) == (s.machine.state == State.RUNNING)
        for eff in s.effects:
            if eff in (Effect.END_EPISODE, Effect.ABORT_EPISODE):
                assert open_
                open_ = False
            elif eff == Effect.BEGIN_EPISODE:
                assert not open_
                open_ = True
        assert s.machine.episode == before.episode + s.effects.count(Effect.BEGIN_EPISODE)
        assert open_ == (s.machine.state in (State.RUNNING, State.PAUSED)), (before.state, event, s)


@settings(max_examples=300, deadline=None)
@given(MACHINES, st.lists(EVENTS, max_size=40))
def test_fresh_scenes_only_in_sim_from_idle_and_never_under_a_running_episode(m0, events):
    taken, _ = run(m0, events)
    for before, event, _, s in taken:
        if Effect.FRESH_SCENE in s.effects:
            assert before.sim and before.state == State.IDLE
            assert s.machine.scene == before.scene + 1
            assert event == Event.RESET or (before.fresh_scene and before.scene_used)
        else:
            assert s.machine.scene == before.scene


def test_the_module_table_is_the_documented_one():
    assert ALLOWED == DOCUMENTED


def test_the_documented_rules_by_example():
    m = Machine()
    with pytest.raises(Refused, match="no_instruction"):
        step(m, Event.START)
    s = step(m, Event.INSTRUCT, text="go")
    assert s.machine.state == State.RUNNING and s.effects == (Effect.BEGIN_EPISODE,) and s.machine.episode == 1
    s = step(s.machine, Event.PAUSE)
    assert s.machine.state == State.PAUSED and s.effects == (Effect.HOLD_HERE,)
    s = step(s.machine, Event.INSTRUCT, text="go")        # resumes the same episode
    assert s.machine.state == State.RUNNING and s.effects == (Effect.RESUME_EPISODE,) and s.machine.episode == 1
    s = step(s.machine, Event.INSTRUCT, text="another")   # a new text while running: a new episode in place
    assert s.effects == (Effect.END_EPISODE, Effect.BEGIN_EPISODE) and s.machine.episode == 2 and not s.changed
    s = step(s.machine, Event.ESTOP)
    assert s.machine.state == State.FAULT and s.effects == (Effect.STOP_CONTROLLER, Effect.ABORT_EPISODE)
    f = step(s.machine, Event.FAULT, reason="later")      # latched: the first reason stays
    assert f.machine.fault == "estop" and not f.changed
    with pytest.raises(Refused, match="recover first"):
        step(s.machine, Event.INSTRUCT, text="go")
    s = step(s.machine, Event.RECOVER)
    assert s.machine.state == State.IDLE and s.machine.fault is None
    with pytest.raises(Refused, match="bad_state"):
        step(s.machine, Event.RECOVER)
    with pytest.raises(Refused, match="not_sim"):
        step(s.machine, Event.RESET)


def test_sim_second_instruction_starts_in_a_fresh_scene_with_the_next_seed():
    m = Machine(sim=True, fresh_scene=True)
    s = step(m, Event.INSTRUCT, text="go")
    assert s.effects == (Effect.BEGIN_EPISODE,) and s.machine.scene == 0   # the first uses the scene at start
    s = step(s.machine, Event.TASK_SUCCESS)
    assert s.machine.state == State.IDLE and s.success is True
    s = step(s.machine, Event.INSTRUCT, text="go")
    assert s.effects == (Effect.FRESH_SCENE, Effect.BEGIN_EPISODE) and s.machine.scene == 1
    s = step(step(s.machine, Event.STOP).machine, Event.RESET)
    assert s.effects == (Effect.FRESH_SCENE,) and s.machine.scene == 2
    s = step(s.machine, Event.START)                       # a scene made by reset is not used yet
    assert s.effects == (Effect.BEGIN_EPISODE,) and s.machine.scene == 2
    with pytest.raises(Refused, match="bad_state"):
        step(s.machine, Event.RESET)                       # not under a running episode
