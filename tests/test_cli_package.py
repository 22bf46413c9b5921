"""The CLI as a package (issue 47.4): it starts without torch where the command needs none, it runs as
`python -m edge_steer.cli`, and nothing below it imports it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import edge_steer


def _modules_after(args: list[str]) -> tuple[int, set[str]]:
    code = ("import json, sys\n"
            "from edge_steer.cli import app\n"
            "try:\n"
            f"    app({args!r})\n"
            "except SystemExit as e:\n"
            "    code = e.code\n"
            "print(json.dumps([code, sorted(sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    code, mods = json.loads(out.stdout.strip().splitlines()[-1])
    return code, set(mods)


@pytest.mark.parametrize("args", [["--help"], ["send", "--help"], ["keys", "--help"]])
def test_help_and_send_start_without_torch(args):
    code, loaded = _modules_after(args)
    assert code == 0
    heavy = sorted(m for m in loaded if m.split(".")[0] in ("torch", "mujoco"))
    assert not heavy, f"edge-steer {' '.join(args)} imports {heavy[:5]}"


def test_the_torch_probe_can_fail():
    # a command that loads a model does import torch: the probe above would see it
    _, loaded = _modules_after(["apply", "--steering", "/nonexistent.safetensors", "--out", "/nonexistent/out"])
    assert "torch" in loaded


def test_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "edge_steer.cli", "send", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "Send a command to a running `edge-steer serve`" in r.stdout


def test_nothing_below_the_cli_imports_it():
    root = Path(edge_steer.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if root / "cli" in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.ImportFrom) and node.module == "edge_steer":
                names = [f"edge_steer.{a.name}" for a in node.names]
            offenders += [f"{path.relative_to(root)}: {n}" for n in names
                          if n == "edge_steer.cli" or n.startswith("edge_steer.cli.")]
    assert not offenders
