"""The command handlers: one per protocol command, each a thin call into its host (the daemon).

A request reaches here already decoded and validated (protocol.py) and authorised (server.py). State
changes go through the state machine (`host.apply`); what is left here is what a command means
beyond its transition: which steering delta a name resolves to, and each command's `result` map
(docs/protocol.md, "Results").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from edge_steer.runtime.protocol import SCHEMA, Request
from edge_steer.runtime.statemachine import Event, Refused


class CommandHost(Protocol):
    def apply(self, event: Event, **kwargs: Any) -> dict: ...
    def scene(self) -> dict: ...
    def status(self) -> dict: ...
    def set_steering(self, path: Path | None, name: str | None) -> None: ...
    def set_recording(self, on: bool) -> dict: ...
    def request_shutdown(self) -> None: ...


class CommandHandlers:
    def __init__(self, host: CommandHost, steering_dir: str):
        self.host, self.steering_dir = host, steering_dir
        missing = [c for c in SCHEMA if not hasattr(self, f"cmd_{c}")]
        assert not missing, f"protocol commands without a handler: {missing}"

    def handle(self, req: Request) -> dict[str, Any]:
        return getattr(self, f"cmd_{req.cmd}")(**req.args)

    def cmd_status(self) -> dict:
        return self.host.status()

    def cmd_instruct(self, text: str, start: bool = True) -> dict:
        return {**self.host.apply(Event.INSTRUCT, text=text, start=start), "instruction": text}

    def cmd_start(self) -> dict:
        return self.host.apply(Event.START)

    def cmd_pause(self) -> dict:
        return self.host.apply(Event.PAUSE)

    def cmd_stop(self) -> dict:
        return self.host.apply(Event.STOP)

    def cmd_estop(self) -> dict:
        return {**self.host.apply(Event.ESTOP), "controller": "stopped"}

    def cmd_recover(self) -> dict:
        return self.host.apply(Event.RECOVER)

    def cmd_reset(self) -> dict:
        return {**self.host.apply(Event.RESET), **self.host.scene()}

    def cmd_set_steering(self, task: str = "") -> dict:
        if task and ("/" in task or "\\" in task or task.startswith(".")):
            raise Refused("bad_field", "set_steering.task is a name, not a path")
        path = None
        if task:
            if not self.steering_dir:
                raise Refused("no_steering", "engine.steering_dir is not configured")
            path = Path(self.steering_dir) / task
            if not path.exists():
                raise Refused("no_steering", f"no steering delta for {task!r} at {path}")
            if (path / "steering.safetensors").is_file():   # a finetune run directory named by its task
                path = path / "steering.safetensors"
        self.host.set_steering(path, task or None)
        return {"steering": task or None}

    def cmd_record(self, on: bool) -> dict:
        return self.host.set_recording(on)

    def cmd_shutdown(self) -> dict:
        self.host.request_shutdown()
        return {"state": "shutting_down"}
