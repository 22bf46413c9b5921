"""Real-time scheduling of the 1 kHz threads: SCHED_FIFO per thread where the OS allows it, a clear
reason where it does not, and `realtime.required` refusing to start without it."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from edge_steer.realtime import LIBFRANKA_PRIORITY, make_realtime, scheduling
from edge_steer.runtime.config import ConfigError, RealtimeConfig, RobotConfig, ServeConfig

linux = pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="per-thread scheduling is Linux's")


def _idle_thread():
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    return t, stop


def _may_use_fifo() -> bool:
    """Whether this process may raise a thread to SCHED_FIFO (root, CAP_SYS_NICE or RLIMIT_RTPRIO)."""
    t, stop = _idle_thread()
    try:
        return make_realtime(t, 1) is None
    finally:
        stop.set()


@linux
def test_make_realtime_raises_only_that_thread_or_says_why_not():
    t, stop = _idle_thread()
    try:
        before = scheduling(threading.current_thread())
        cpu = min(os.sched_getaffinity(0))
        refused = make_realtime(t, 15, cpu)
        if refused is None:
            assert scheduling(t) == "SCHED_FIFO 15"
            assert os.sched_getaffinity(t.native_id) == {cpu}
        else:
            assert "LimitRTPRIO" in refused and scheduling(t) == "SCHED_OTHER"
        assert scheduling(threading.current_thread()) == before   # the rest of the process is untouched
    finally:
        stop.set()
    t.join()
    assert scheduling(t) == "not running"


@linux
def test_refusal_names_the_limit_and_leaves_the_thread_running(monkeypatch):
    def deny(*a):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "sched_setscheduler", deny)
    t, stop = _idle_thread()
    try:
        msg = make_realtime(t, 10)
        assert "SCHED_FIFO 10 refused" in msg and "RLIMIT_RTPRIO" in msg and "LimitRTPRIO" in msg
        assert t.is_alive() and scheduling(t) == "SCHED_OTHER"
    finally:
        stop.set()


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="has not started"):
        make_realtime(threading.Thread(target=lambda: None), 10)
    t, stop = _idle_thread()
    try:
        with pytest.raises(ValueError, match="1..99"):
            make_realtime(t, 100)
    finally:
        stop.set()


@linux
def test_sim_panda_loop_takes_libfranka_priority_when_allowed():
    from edge_steer.sim.panda import SimPanda
    arm = SimPanda(realtime=True)
    try:
        if _may_use_fifo():
            assert arm.rt_refused is None and scheduling(arm._thread) == f"SCHED_FIFO {LIBFRANKA_PRIORITY}"
        else:
            assert "refused" in arm.rt_refused and scheduling(arm._thread) == "SCHED_OTHER"
    finally:
        arm.close()


def test_realtime_config_is_validated():
    with pytest.raises(ConfigError, match="realtime.priority"):
        ServeConfig.sim().with_(realtime={"priority": 100})
    with pytest.raises(ConfigError, match="realtime.required"):
        ServeConfig.sim().with_(realtime={"priority": 0, "required": True})
    if hasattr(os, "sched_getaffinity"):
        with pytest.raises(ConfigError, match="realtime.cpu 4096"):
            ServeConfig.sim().with_(realtime={"cpu": 4096})
    # below libfranka's control thread by default: ours must never preempt the robot's own loop
    assert 0 < RealtimeConfig().priority < LIBFRANKA_PRIORITY


@linux
@pytest.mark.timeout(60)
def test_daemon_start_refuses_without_realtime_when_required(monkeypatch):
    from edge_steer.runtime.daemon import Daemon
    from edge_steer.runtime.launch import free_endpoint
    from edge_steer.sim.panda_process import SimPandaProcess

    real = SimPandaProcess._spawn     # the robot process's loop, where the stage ticks, is refused SCHED_FIFO

    def spawn(self, *a, **kw):
        real(self, *a, **kw)
        self.rt_refused = "SCHED_FIFO 20 refused (test)"
    monkeypatch.setattr(SimPandaProcess, "_spawn", spawn)
    want = "realtime.required: the robot process's 1 kHz loop: SCHED_FIFO 20 refused"
    cfg = ServeConfig.sim().with_(zmq={"command": free_endpoint(), "telemetry": free_endpoint()},
                                  engine={"backend": "expert"}, realtime={"required": True})
    d = Daemon(cfg)
    with pytest.raises(ConfigError, match=want):
        d.start()
    assert d.robot.arm._proc.poll() is not None   # start() failing closed everything it opened


def test_panda_backend_asks_libfranka_to_enforce_realtime(monkeypatch):
    panda_py = pytest.importorskip("panda_py")
    from edge_steer.runtime.robot import RobotError, open_robot

    seen = {}

    def fake_panda(host, **kw):
        seen.update(host=host, **kw)
        raise RuntimeError("no robot here")
    monkeypatch.setattr(panda_py, "Panda", fake_panda)
    with pytest.raises(RobotError, match="cannot connect to the Panda at 192.0.2.7: no robot here"):
        open_robot(RobotConfig(backend="panda", host="192.0.2.7"), enforce_realtime=True)
    assert seen["realtime_config"] == panda_py.libfranka.RealtimeConfig.kEnforce
    with pytest.raises(RobotError):
        open_robot(RobotConfig(backend="panda", host="192.0.2.7"))
    assert seen["realtime_config"] == panda_py.libfranka.RealtimeConfig.kIgnore


@pytest.mark.parametrize("fifo", [False, True])
def test_sleep_until_never_returns_early(fifo):
    import time

    from edge_steer.realtime import sleep_until
    for gap in (0.0, 0.0001, 0.0007, 0.002):
        deadline = time.perf_counter() + gap
        sleep_until(deadline, fifo)
        assert time.perf_counter() >= deadline


def test_duration_histogram_percentiles_bound_the_exact_ones_within_a_bin():
    from edge_steer.realtime import DurationHistogram
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.exponential(40e-6, 5000), rng.uniform(1e-3, 5e-3, 60), [0.0, 2e-7, 30.0]])
    h = DurationHistogram()
    for v in x:
        h.add(float(v))
    assert h.n == x.size and h.max == x.max()
    for q in (50, 90, 99, 99.9):
        exact = np.percentile(x, q, method="inverted_cdf")
        got = h.percentiles(q)[0]
        assert exact <= got <= max(exact * 1.024, 1e-6), q      # never below, at most one bin (2.3 %) above
    s = h.summary("err_us", 1e-6)
    assert set(s) == {"err_us_p50", "err_us_p99", "err_us_max"} and s["err_us_max"] == pytest.approx(30e6)
    h.clear()
    assert h.n == 0 and h.summary("err_us", 1e-6) == {} and np.isnan(h.percentiles(50)[0])
