"""Writing result sections into the markdown files in docs/ (benchmark tools and `edge-steer bench`)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def git_commit() -> str:
    """Short hash of HEAD, with "+dirty" when tracked files differ from it: the stamp results carry."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return (out or "unknown") + ("+dirty" if dirty else "")


def upsert_section(path: str, text: str, title: str = "# Benchmarks") -> None:
    """Replace the `## ` section whose heading is text's first line, or append it."""
    heading = text.splitlines()[0]
    body = open(path).read() if os.path.exists(path) else f"{title}\n\n"
    start = body.find(heading + "\n")
    if start >= 0:
        end = body.find("\n## ", start + len(heading))
        body = body[:start] + text.rstrip() + "\n" + (body[end:] if end >= 0 else "")
    else:
        body = body.rstrip() + "\n\n" + text.rstrip() + "\n"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(body)


def this_machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU a benchmark's seconds are measured on: model, cores and its widest vector units, the one description
    every result header and `bench adapt`'s cells carry. Sessions' VMs differ about 3x in speed (two "AMD EPYC,
    2 cores" VMs did, one with AVX512-BF16), so times are only compared or pooled within one machine."""
    info = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    units = next((name for flag, name in (("amx_tile", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"),
                                          ("avx2", "AVX2")) if flag in flags), "")
    name = info.get("model name") or platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores" + (f", {units}" if units else "")
