"""Shared by the benchmark tools: write a result section into a markdown file in docs/."""

from __future__ import annotations

import subprocess

from edge_steer.bench.docs import upsert_section  # noqa: F401  (re-exported for the tools)


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return out + ("+dirty" if dirty else "")
