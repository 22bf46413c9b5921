"""SIGKILL while recording (issue 8): the daemon in a child process, killed mid-episode, then restarted
on the same dataset. In its own module so it never runs beside test_reliability_faults' module-scoped
cell: two sim robots' 1 kHz loops at SCHED_FIFO took 1.4 of this machine's 2 cores and starved the
daemon under test."""

from __future__ import annotations

import signal

import pytest

from edge_steer.reliability.faults import kill_while_recording

pytestmark = pytest.mark.timeout(180)


def test_sigkill_while_recording_keeps_completed_episodes_only_and_restart_appends(tmp_path):
    res = kill_while_recording(tmp_path, signal.SIGKILL, episode_s=0.8)
    a, b = res["after_kill"], res["after_restart"]
    assert a["exit_code"] == -signal.SIGKILL
    assert a["episodes"] == 1 and a["tasks"] == ["first episode"] and a["frames"] == sum(a["lengths"]) > 0, a
    assert b["episodes"] == 2 and b["indices"] == [0, 1] and b["tasks"] == ["first episode", "after restart"], b
    assert b["readable_frames"] == b["frames"]
