"""Writing result sections into the markdown files in docs/ (benchmark tools and `edge-steer bench`)."""

from __future__ import annotations

import os
import subprocess


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
