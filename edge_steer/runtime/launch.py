"""`edge-steer serve` as a child process on free localhost ports, and the client that drives it.

The end-to-end demo, the subprocess tests and the reliability benchmark all start the daemon this one
way: a TOML config whose [zmq] section points at fresh ports, the log to a file, and SIGTERM to stop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def free_endpoint(host: str = "127.0.0.1") -> str:
    """A tcp:// endpoint on a port the OS just handed out (free now; racy only against other binders)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def wait_for(pred: Callable[[], T], timeout: float = 10.0, step: float = 0.05, what: str = "condition") -> T:
    """Poll `pred` until it returns something truthy and return that; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g} s")
        time.sleep(step)


class ServeProcess:
    """`edge-steer serve --config` in a child process; `with` starts it, waits until it answers
    `status`, and stops it with SIGTERM (SIGKILL if it hangs)."""

    def __init__(self, workdir: str | Path, config: str = "", name: str = "serve", up_timeout: float = 120.0,
                 reply_timeout_ms: int = 10_000):
        from edge_steer.client import Client

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.command, self.telemetry = free_endpoint(), free_endpoint()
        self.config_path = self.workdir / f"{name}.toml"
        self.config_path.write_text(f'[zmq]\ncommand = "{self.command}"\ntelemetry = "{self.telemetry}"\n{config}')
        self.log_path = self.workdir / f"{name}.log"
        self.up_timeout = up_timeout
        self.proc: subprocess.Popen | None = None
        # a liveness bound, not a latency check: on a slow 2-core machine running the suite, a loaded daemon
        # was seen taking over 2 s to answer `status` (bench_serve measures the round trip)
        self.client = Client(self.command, self.telemetry, timeout_ms=reply_timeout_ms)

    def start(self) -> "ServeProcess":
        with open(self.log_path, "w") as log:   # the child keeps its own descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_steer.cli", "serve", "--config",
                                          str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for(self._answers, timeout=self.up_timeout, step=0.3, what="serve answering status")
        return self

    def _answers(self) -> Any:
        from edge_steer.client import ClientTimeout
        if self.proc.poll() is not None:
            raise RuntimeError(f"serve exited early (code {self.proc.returncode}):\n{self.log()[-2000:]}")
        try:
            return self.client.status()
        except ClientTimeout:
            return None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def signal(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send `sig` and wait for the exit code (SIGKILL after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        if self.proc is not None:
            self.signal()
        self.client.close()

    def __enter__(self) -> "ServeProcess":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()
