"""`edge-steer serve | send | keys generate`: the on-robot daemon, its client, its CURVE keys.
Nothing here imports torch at module level: `send` must start fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from edge_steer.cli._common import _fail, console


def serve(config: Optional[Path] = typer.Option(None, help="TOML config (docs/serve.md); default: --sim's config"),
          sim: bool = typer.Option(False, "--sim", help="simulated robot + cameras, default model, localhost"),
          task: Optional[str] = typer.Option(None, help="sim: the scene's task (default red_cube_on_blue_plate)"),
          engine: Optional[str] = typer.Option(None, help="override engine.backend (torch|onnxruntime|tensorrt|expert)"),
          model: Optional[Path] = typer.Option(None, help="override engine.path"),
          command: Optional[str] = typer.Option(None, help="override zmq.command endpoint"),
          telemetry: Optional[str] = typer.Option(None, help="override zmq.telemetry endpoint")) -> None:
    """Run the on-robot daemon: camera -> engine -> 1 kHz setpoints, ZMQ commands and telemetry."""
    from edge_steer.runtime.config import ConfigError, ServeConfig, load_config
    from edge_steer.runtime.serve import run

    if config is None and not sim:
        _fail("give --config FILE for a robot, or --sim for the simulated cell")
    try:
        cfg = load_config(config) if config is not None else ServeConfig.sim()
        robot = {"task": task} if task else {}
        eng = {**({"backend": engine} if engine else {}), **({"path": str(model)} if model else {})}
        zmq_ = {**({"command": command} if command else {}), **({"telemetry": telemetry} if telemetry else {})}
        cfg = cfg.with_(**{k: v for k, v in (("robot", robot), ("engine", eng), ("zmq", zmq_)) if v})
        code = run(cfg)
    except (ConfigError, RuntimeError, ValueError) as e:
        _fail(str(e))
    raise typer.Exit(code=code)


def send(text: Optional[str] = typer.Argument(None, help="instruction for the robot (starts it unless --no-start)"),
         status: bool = typer.Option(False, "--status", help="print the daemon's status"),
         start: bool = typer.Option(False, "--start", help="start / resume"),
         pause: bool = typer.Option(False, "--pause"), stop: bool = typer.Option(False, "--stop"),
         estop: bool = typer.Option(False, "--estop", help="stop the controller at once (FAULT)"),
         recover: bool = typer.Option(False, "--recover", help="leave FAULT"),
         record: Optional[str] = typer.Option(None, help="on | off: record episodes to the dataset"),
         steer: Optional[str] = typer.Option(None, help="steering task name ('' = base model)"),
         shutdown: bool = typer.Option(False, "--shutdown", help="stop the daemon"),
         no_start: bool = typer.Option(False, "--no-start", help="with TEXT: set the instruction only"),
         endpoint: str = typer.Option("tcp://127.0.0.1:5555", help="daemon command endpoint"),
         server_key: Optional[Path] = typer.Option(None, help="CURVE: the daemon's public key file (server.key)"),
         client_key: Optional[Path] = typer.Option(None, help="CURVE: this client's secret key file (*.key_secret)"),
         timeout_ms: int = typer.Option(3000, min=1), as_json: bool = typer.Option(False, "--json")) -> None:
    """Send a command to a running `edge-steer serve` (one per call)."""
    from edge_steer.client import Client, ClientError, ClientTimeout

    chosen = [(n, a) for n, a in (("instruct", {"text": text, "start": not no_start} if text else None),
                                  ("status", {} if status else None), ("start", {} if start else None),
                                  ("pause", {} if pause else None), ("stop", {} if stop else None),
                                  ("estop", {} if estop else None), ("recover", {} if recover else None),
                                  ("record", {"on": record == "on"} if record is not None else None),
                                  ("set_steering", {"task": steer} if steer is not None else None),
                                  ("shutdown", {} if shutdown else None)) if a is not None]
    if len(chosen) != 1:
        _fail("give exactly one of: TEXT, --status, --start, --pause, --stop, --estop, --recover, --record, "
              "--steer, --shutdown")
    if record is not None and record not in ("on", "off"):
        _fail("--record takes on or off")
    cmd, args = chosen[0]
    server_public = None
    if (server_key is None) != (client_key is None):
        _fail("--server-key and --client-key go together (CURVE)")
    if server_key is not None:
        import zmq.auth
        try:
            server_public = zmq.auth.load_certificate(server_key)[0]
        except (OSError, ValueError) as e:
            _fail(f"cannot read the server key {server_key}: {e}")
    with Client(endpoint, timeout_ms=timeout_ms, server_public_key=server_public,
                client_certificate=str(client_key) if client_key else None) as client:
        try:
            result = client.request(cmd, **args)
        except ClientTimeout as e:
            _fail(f"{e} (is `edge-steer serve` running?)")
        except ClientError as e:
            _fail(f"{cmd} refused: {e.code}: {e.reason}")
    if as_json or cmd == "status":
        print(json.dumps(result, indent=1, default=str))
    else:
        console.print(f"{cmd}: ok " + " ".join(f"{k}={v}" for k, v in result.items()))





def keys_generate(out: Path = typer.Option(..., help="directory for NAME.key (public) and NAME.key_secret"),
                  name: str = typer.Option("server", help="key pair name: 'server', or one per operator/client")) -> None:
    """Write a CURVE key pair (zmq.auth certificate format); the secret file is readable by its owner only."""
    from edge_steer.runtime.keys import write_key_pair

    if not name.isidentifier():
        _fail(f"--name must be a plain name, got {name!r}")
    try:
        public, secret = write_key_pair(out, name)
    except ValueError as e:
        _fail(str(e))
    console.print(f"public key: {public} (give it to the other side; clients' go in zmq.curve_authorized_keys)")
    console.print(f"secret key: {secret} (mode 600; never copy it off this machine)")

