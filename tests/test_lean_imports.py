"""The robot's 1 kHz child process and the daemon's safety and setpoint modules import neither torch nor
MuJoCo (issue 47): each is imported in a fresh interpreter and sys.modules is read back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# what runtime/panda_process.py's child imports to run its loop with the setpoint stage beside it
# (robot_child.serve imports realtime, motion, safety and setpoint when it starts), and the contract/franka
# rooms both sides stand on
LEAN = ["edge_steer.runtime.panda_process", "edge_steer.runtime.robot_child", "edge_steer.runtime.robot_process",
        "edge_steer.runtime.shm", "edge_steer.runtime.messages", "edge_steer.runtime.motion",
        "edge_steer.runtime.safety", "edge_steer.runtime.setpoint", "edge_steer.realtime", "edge_steer.contract",
        "edge_steer.franka.arm", "edge_steer.franka.types", "edge_steer.franka.queries", "edge_steer.franka.gripper",
        "edge_steer.runtime.robot"]


def _loaded(modules: list[str]) -> set[str]:
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("module", LEAN)
def test_the_robot_side_imports_neither_torch_nor_mujoco(module):
    loaded = _loaded([module])
    assert module in loaded
    heavy = {m for m in loaded if m.split(".")[0] in ("torch", "mujoco") or m.startswith("edge_steer.sim")}
    assert not heavy, f"{module} pulls in {sorted(heavy)[:5]}"


def test_the_check_can_fail():
    # the simulator's backend does import MuJoCo: the probe above would see it
    assert "mujoco" in _loaded(["edge_steer.sim.panda"])
