"""The safety module: the setpoint filter's guarantees for any input, and the state checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_steer.runtime.config import SafetyConfig
from edge_steer.runtime.safety import (JointLimits, SafetyFilter, SafetyViolation, _braking_distance, braking_step,
                                       check_joints, check_robot_errors, check_watchdogs, qconj, qlog, qmul)

CFG = SafetyConfig()
DT = 0.001
START_P = (0.4, 0.0, 0.3)
START_Q = (1.0, 0.0, 0.0, 0.0)  # gripper down

any_float = st.one_of(st.floats(-5, 5), st.sampled_from([math.nan, math.inf, -math.inf, 1e9, -1e9]))
raw_target = st.tuples(st.tuples(any_float, any_float, any_float),
                       st.tuples(any_float, any_float, any_float, any_float),
                       st.tuples(st.floats(-0.01, 0.01), st.floats(-0.01, 0.01), st.floats(-0.01, 0.01)),
                       st.integers(1, 400))


def _unit(q):
    n = math.sqrt(sum(x * x for x in q)) if all(math.isfinite(x) for x in q) else 0.0
    return tuple(x / n for x in q) if n > 1e-6 else q  # non-normalisable inputs stay as they are (rejected)


@settings(max_examples=60, deadline=None)
@given(st.lists(raw_target, min_size=1, max_size=8), st.booleans())
def test_no_setpoint_leaves_the_limits_for_any_input(seq, normalise):
    f = SafetyFilter(CFG, DT)
    f.reset(START_P, START_Q)
    lo, hi = np.array(CFG.workspace_min), np.array(CFG.workspace_max)
    ps, qs = [np.array(f.p)], [f.q]
    for p, q, up, n in seq:
        q = _unit(q) if normalise else q
        for _ in range(n):
            f.apply(p, q, up, (0.0, 0.0, 0.0))
            ps.append(np.array(f.p))
            qs.append(f.q)
    P = np.array(ps)
    assert np.all(np.isfinite(P)) and np.all(np.isfinite(np.array(qs)))
    assert np.all(P >= lo - 1e-12) and np.all(P <= hi + 1e-12)
    v = np.diff(P, axis=0)
    assert np.abs(v).max() <= CFG.max_speed * DT * (1 + 1e-9)
    if len(v) > 1:
        assert np.abs(np.diff(v, axis=0)).max() <= CFG.max_accel * DT * DT * (1 + 1e-6) + 1e-15
    w = np.array([qlog(qmul(b, qconj(a))) for a, b in zip(qs, qs[1:])])
    assert np.linalg.norm(w, axis=1).max() <= CFG.max_rot_speed * DT * (1 + 1e-6)
    if len(w) > 1:
        assert np.linalg.norm(np.diff(w, axis=0), axis=1).max() <= CFG.max_rot_accel * DT * DT * (1 + 1e-3) + 1e-12


def test_filter_reaches_a_target_without_overshoot():
    f = SafetyFilter(CFG, DT)
    f.reset(START_P, START_Q)
    goal = (0.5, 0.1, 0.2)
    xs = []
    for _ in range(3000):
        f.apply(goal, START_Q)
        xs.append(f.p[0])
    assert np.allclose(f.p, goal, atol=1e-9)
    assert max(xs) <= goal[0] + 1e-12


def test_non_finite_target_is_rejected_and_the_arm_brakes():
    f = SafetyFilter(CFG, DT)
    f.reset(START_P, START_Q)
    for _ in range(200):
        assert f.apply((0.6, 0.0, 0.3), START_Q)
    moving = f.step[0]
    assert moving > 0
    assert not f.apply((math.nan, 0, 0), START_Q)
    assert not f.apply((0.6, 0, 0), (0.0, 0.0, 0.0, 2.0))  # not a rotation
    for _ in range(1000):
        f.apply((math.nan, 0, 0), START_Q)
    assert abs(f.step[0]) < 1e-12 and f.rejected > 1000


def test_start_outside_the_box_is_refused():
    with pytest.raises(SafetyViolation, match="outside the workspace"):
        SafetyFilter(CFG, DT).reset((2.0, 0.0, 0.3), START_Q)


@pytest.mark.parametrize("d", [0.0, 1e-9, 3e-6, 1e-4, 0.01, 0.3])
def test_braking_step_is_the_exact_discrete_stopping_step(d):
    delta = CFG.max_accel * DT * DT
    s = braking_step(d, delta)
    assert s <= d + 1e-15
    assert _braking_distance(s, delta) <= d * (1 + 1e-9) + 1e-15
    # one step allowed now leaves the next (s - delta) allowed after moving s
    assert braking_step(d - s, delta) >= s - delta - 1e-12


def test_joint_margin_and_robot_error_checks():
    lim = JointLimits.panda()
    mid = (lim.lower + lim.upper) / 2
    assert check_joints(mid, lim, 0.05) is None
    q = mid.copy()
    q[3] = lim.upper[3] - 0.01
    assert "joint 4" in check_joints(q, lim, 0.05)
    q[3] = np.nan
    assert check_joints(q, lim, 0.05).startswith("joint positions not finite")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-4.0, 4.0), min_size=7, max_size=7), st.floats(0.1, 1.0))
def test_the_joint_velocity_check_faults_exactly_above_its_share_of_the_limit(dq, share):
    """Joint speeds are checked too (a slow TCP near a singularity can need fast joints): a fault
    names the first joint above `share` of its limit, and no speed at or under it faults."""
    lim = JointLimits.panda()
    mid = (lim.lower + lim.upper) / 2
    dq = np.array(dq)
    verdict = check_joints(mid, lim, 0.05, dq, share)
    over = np.flatnonzero(np.abs(dq) > share * lim.velocity)
    if over.size:
        assert verdict.startswith("joint_velocity_margin") and f"joint {over[0] + 1} " in verdict
    else:
        assert verdict is None
    bad = dq.copy()
    bad[2] = np.inf
    assert check_joints(mid, lim, 0.05, bad, share).startswith("joint velocities not finite")
    assert check_robot_errors([], "kMove") is None
    assert "reflex" in check_robot_errors(["reflex"], "kReflex")
    assert check_robot_errors([], "kReflex") is not None


def test_watchdogs_hold_then_fault():
    c = SafetyConfig(stale_frame_ms=100, camera_fault_ms=500, inference_stop_ms=300)
    assert check_watchdogs(c, 10.0, 0.01, None, None).hold is None  # not running: nothing to watch
    assert check_watchdogs(c, 10.0, 0.01, 9.9, 9.95).hold is None
    assert check_watchdogs(c, 10.0, 0.2, 9.95, 9.95).hold is None  # just started: frames seen before don't count
    v = check_watchdogs(c, 10.0, 0.2, 9.7, 9.95)
    assert v.hold and v.hold.startswith("stale_frame") and v.fault is None
    assert check_watchdogs(c, 10.0, 0.6, 9.0, 9.95).fault.startswith("camera_stale")
    assert check_watchdogs(c, 10.0, 0.01, 9.0, 9.5).fault.startswith("inference_deadline")
    assert check_watchdogs(c, 10.0, None, 9.99, None).hold is None  # just started, no frame yet
