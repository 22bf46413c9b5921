"""Real-time scheduling for one thread.

Linux schedules threads, not processes, so a 1 kHz loop can run SCHED_FIFO while the rest of the
process (inference, cameras, ZMQ) stays SCHED_OTHER: whenever the loop wakes it preempts those
threads' CPU time instead of queueing behind them. libfranka does this for its control thread
(SCHED_FIFO 20); the setpoint stage does it below that, and SimPanda, libfranka's twin, does what
libfranka does. It needs root, CAP_SYS_NICE or an RLIMIT_RTPRIO at least the priority
(systemd: `LimitRTPRIO=`). Python threads still share the GIL; `serve` shortens the switch interval.
"""

from __future__ import annotations

import math
import os
import resource
import threading
import time
from typing import Callable

import numpy as np

LIBFRANKA_PRIORITY = 20   # libfranka's control thread (src/control_loop_base.cpp, kThreadPriority)
SPIN_S = 0.0003           # a SCHED_OTHER loop sleeps until this long before its deadline, then yields


def running_fifo() -> bool:
    """Whether the calling thread is SCHED_FIFO now (a loop asks each tick: one cheap syscall)."""
    return hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) == os.SCHED_FIFO


def sleep_until(deadline: float, fifo: bool) -> None:
    """Wait until time.perf_counter() >= deadline. A SCHED_OTHER thread wakes up to the timer slack
    (50 us) plus a run-queue wait late, so it sleeps to SPIN_S before and yields from there. A
    SCHED_FIFO thread has no timer slack and preempts on waking, and its sched_yield hands the CPU to
    no lower priority (yielding would only burn the core), so it sleeps the whole gap."""
    rem = deadline - time.perf_counter()
    spin = 0.0 if fifo else SPIN_S
    if rem > spin:
        time.sleep(rem - spin)
    while time.perf_counter() < deadline:
        time.sleep(0)


def make_realtime(thread: threading.Thread, priority: int, cpu: int = -1) -> str | None:
    """Give a started thread SCHED_FIFO `priority` (1..99; 0 leaves its policy alone) and, with
    `cpu` >= 0, pin it to that CPU. Returns None when done, else why not (the thread runs on as it was)."""
    tid = thread.native_id
    if tid is None:
        raise ValueError(f"thread {thread.name!r} has not started")
    if priority and not 1 <= priority <= 99:
        raise ValueError(f"SCHED_FIFO priority must be in 1..99, got {priority}")
    if not priority and cpu < 0:
        return None
    if not hasattr(os, "sched_setscheduler"):
        return "real-time scheduling needs Linux"
    try:
        if priority:
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(priority))
        if cpu >= 0:
            os.sched_setaffinity(tid, {cpu})
    except PermissionError as e:
        limit = resource.getrlimit(resource.RLIMIT_RTPRIO)[0]
        return (f"SCHED_FIFO {priority} refused ({e.strerror}; RLIMIT_RTPRIO is {limit}): "
                "run under systemd with LimitRTPRIO=, with CAP_SYS_NICE, or as root")
    except OSError as e:   # a CPU outside the allowed set, a thread that has exited
        return f"cannot set scheduling of thread {thread.name!r}: {e.strerror or e}"
    return None


def scheduling(thread: threading.Thread | None) -> str:
    """'SCHED_FIFO 10', 'SCHED_OTHER', or 'not running'."""
    if thread is None or thread.native_id is None or not thread.is_alive():
        return "not running"
    try:
        policy = os.sched_getscheduler(thread.native_id)
        prio = os.sched_getparam(thread.native_id).sched_priority
    except (OSError, AttributeError):
        return "unknown"
    name = {getattr(os, n): n for n in ("SCHED_OTHER", "SCHED_FIFO", "SCHED_RR", "SCHED_BATCH", "SCHED_IDLE")
            if hasattr(os, n)}.get(policy, str(policy))
    return f"{name} {prio}" if prio else name


class DurationHistogram:
    """Durations (s) counted in log-spaced bins from 1 us to 10 s, 100 per decade (2.3 % wide).

    Adding is O(1) and reading a percentile is O(bins). A percentile over the raw 10^5 samples of a
    minute at 1 kHz holds the GIL for ~2 ms, which made both 1 kHz loops miss ticks whenever someone
    asked the daemon for `status`; reading this takes microseconds. Percentiles are the upper edge of
    the bin that holds them (never an under-estimate), capped at the largest sample.
    """

    PER_DECADE = 100
    LOG_LO = -6           # 1 us: bin 0 holds everything up to it
    LO = 10.0 ** LOG_LO
    DECADES = 7           # .. 10 s

    def __init__(self) -> None:
        self.counts = np.zeros(self.DECADES * self.PER_DECADE + 2, np.int64)
        self.n = 0
        self.max = 0.0

    def add(self, x: float) -> None:
        if x > self.max:
            self.max = x
        i = 0 if x <= self.LO else min(self.counts.size - 1, 1 + int((math.log10(x) - self.LOG_LO) * self.PER_DECADE))
        self.counts[i] += 1
        self.n += 1

    def clear(self) -> None:
        self.counts = np.zeros_like(self.counts)
        self.n = 0
        self.max = 0.0

    def percentiles(self, *qs: float) -> list[float]:
        cum = np.cumsum(self.counts)        # one snapshot: the loop keeps adding while we read
        if cum[-1] == 0:
            return [float("nan")] * len(qs)
        idx = np.searchsorted(cum, np.array(qs) / 100.0 * cum[-1])
        upper = np.where(idx > 0, 10.0 ** (self.LOG_LO + idx / self.PER_DECADE), self.LO)
        return [float(min(u, self.max)) for u in upper]

    def summary(self, name: str, unit: float) -> dict[str, float]:
        """{name_p50, name_p99, name_max} in 1/unit (unit=1e-6: microseconds); empty with no samples."""
        if not self.n:
            return {}
        p50, p99 = self.percentiles(50, 99)
        return {f"{name}_p50": p50 / unit, f"{name}_p99": p99 / unit, f"{name}_max": self.max / unit}


class LoopStats:
    """A periodic loop's timing. `period_errors`: |time between two tick starts - period|, the jitter
    the controller sees (cyclictest's measure, taken at wake-up so a tick's own run time does not
    count); `tick_times`: how long each tick ran; `missed_ticks`: periods skipped after falling behind."""

    def __init__(self) -> None:
        self.period_errors = DurationHistogram()
        self.tick_times = DurationHistogram()
        self.missed_ticks = 0

    def clear(self) -> None:
        self.period_errors.clear()
        self.tick_times.clear()
        self.missed_ticks = 0

    def summary(self) -> dict:
        if self.period_errors.n < 10:
            return {}
        return {**self.period_errors.summary("period_err_us", 1e-6), **self.tick_times.summary("tick_us", 1e-6),
                "missed_ticks": self.missed_ticks, "ticks": self.period_errors.n + 1}


def run_periodic(tick: Callable[[], None], period: float, running: Callable[[], bool], stats: LoopStats) -> None:
    """Call `tick` every `period` s on the wall clock until `running()` is false. A loop that falls more
    than a period behind counts the skipped periods and resynchronises rather than bursting to catch up."""
    next_t = time.perf_counter()
    last_wake: float | None = None
    while running():
        wake = time.perf_counter()
        if last_wake is not None:
            stats.period_errors.add(abs(wake - last_wake - period))
        last_wake = wake
        tick()
        done = time.perf_counter()
        stats.tick_times.add(done - wake)
        next_t += period
        behind = done - next_t
        if behind > period:
            stats.missed_ticks += int(behind / period)
            next_t = done
            continue
        sleep_until(next_t, running_fifo())
