"""Where the kernel tests find triton. It is not installed into the test environment itself (see the
`dev` extra in pyproject.toml: beside Mesa's software EGL it crashes processes that render), but into a
folder of its own that only the kernel subprocesses put on their path: `.venv/kernels` beside the
running interpreter's venv, or EDGE_STEER_KERNELS_PATH; or, on a GPU machine, the environment itself."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def kernel_env() -> dict[str, str] | None:
    """Environment for a subprocess that imports triton, or None when triton is nowhere."""
    env = dict(os.environ)
    if importlib.util.find_spec("triton") is not None:
        return env
    for folder in (os.environ.get("EDGE_STEER_KERNELS_PATH"), str(Path(sys.prefix) / "kernels")):
        if folder and (Path(folder) / "triton" / "__init__.py").is_file():
            env["PYTHONPATH"] = os.pathsep.join(p for p in (folder, env.get("PYTHONPATH")) if p)
            return env
    return None


NO_TRITON = ("triton is not installed: `pip install --target .venv/kernels 'triton>=3.0'` "
             "(tools/setup.sh should do this; see pyproject.toml's dev extra)")
