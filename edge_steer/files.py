"""Durable writes for the files a robot loads (checkpoints, deltas, engines, their sidecars, datasets).

Each goes to a hidden temp name beside its target, is fsynced, renamed over the target and the directory
fsynced, so a reader sees the old file or the new one, never a torn one, even after a power cut or a kill
mid-write. A failed write removes its temp file and leaves the target as it was.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"  # temp files are ".<name>.tmp": hidden, and matched by no "*.parquet" / "step_*.pt" glob


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_SUFFIX}")


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)   # fsync needs no write access; on a directory it makes a rename durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path for a writer that wants a file name (torch.save, onnx.save); commit it on exit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"the writer of {path} left nothing at {tmp}")
        _fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_path(path.parent)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through `write(file)` into a temp file, then commit it as `path`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
