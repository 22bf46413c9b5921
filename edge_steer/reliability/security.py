"""CURVE: who gets an effect and who gets nothing, and that no secret key reaches a log or a reply."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from edge_steer.reliability.cell import start_cell
from edge_steer.reliability.fuzz import _snapshot


# runs `edge-steer ARGS` and returns (exit code, output): the caller's CLI (this package never imports it)
RunCli = Callable[[list[str]], tuple[int, str]]


def make_keys(out: Path, *names: str, cli: RunCli) -> dict[str, tuple[Path, Path]]:
    """Through the CLI, as an operator would: `edge-steer keys generate --out DIR --name N`."""
    keys = {}
    for name in names:
        code, output = cli(["keys", "generate", "--out", str(out), "--name", name])
        if code != 0:
            raise RuntimeError(f"keys generate failed: {output}")
        keys[name] = (out / f"{name}.key", out / f"{name}.key_secret")
    return keys


def curve_checks(tmp: Path, cli: RunCli) -> dict[str, bool]:
    """A CURVE daemon with one allowed client key: who gets an effect and who gets nothing; and that no
    secret key reaches the logs (captured at DEBUG, pyzmq's ZAP authenticator included) or a reply."""
    import io

    import zmq.auth

    from edge_steer.client import Client, ClientTimeout
    from edge_steer.runtime.protocol import encode_request
    keys = make_keys(tmp / "keys", "server", "operator", "stranger", cli=cli)
    allowed = tmp / "allowed"
    allowed.mkdir()
    (allowed / "operator.key").write_bytes(keys["operator"][0].read_bytes())
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    res: dict[str, bool] = {}
    try:
        cell = start_cell(tmp, curve={"curve_secret_key": str(keys["server"][1]),
                                      "curve_authorized_keys": str(allowed)})
        d, cmd, tel = cell.daemon, cell.daemon.cfg.zmq.command, cell.daemon.cfg.zmq.telemetry
        server_pub = zmq.auth.load_certificate(keys["server"][0])[0]
        try:
            before = _snapshot(d)
            plain = Client(cmd, tel, timeout_ms=1500)
            try:
                plain.request_raw(encode_request("instruct", text="move"))
                res["plain client gets no reply"] = False
            except ClientTimeout:
                res["plain client gets no reply"] = True
            res["plain client: no state change"] = _snapshot(d) == before
            res["plain subscriber gets no telemetry"] = not list(plain.telemetry(max_messages=1, timeout_ms=1000))
            plain.close()
            stranger = Client(cmd, tel, timeout_ms=1500, server_public_key=server_pub,
                              client_certificate=str(keys["stranger"][1]))
            try:
                stranger.estop()
                res["unknown key gets no reply"] = False
            except ClientTimeout:
                res["unknown key gets no reply"] = True
            res["unknown key: no state change"] = _snapshot(d) == before
            res["unknown subscriber gets no telemetry"] = not list(stranger.telemetry(max_messages=1, timeout_ms=1000))
            stranger.close()
            op = Client(cmd, tel, timeout_ms=5000, server_public_key=server_pub,
                        client_certificate=str(keys["operator"][1]))
            res["allowed key: commands work"] = op.instruct("put the red cube on the blue plate")["state"] == "RUNNING"
            status = op.status()
            res["allowed key: telemetry"] = len(list(op.telemetry(max_messages=5))) == 5
            op.stop()
            op.close()
            code, output = cli(["send", "--status", "--endpoint", cmd, "--server-key", str(keys["server"][0]),
                                "--client-key", str(keys["operator"][1])])
            res["`edge-steer send --server-key --client-key` works"] = code == 0 and '"state"' in output
            res["only the allowed client's 4 requests reached the handler"] = d.server.requests == 4
        finally:
            cell.daemon.close()
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    logs = buf.getvalue()
    secrets = {n: zmq.auth.load_certificate(k[1])[1] for n, k in keys.items()}
    res["secret keys never logged"] = all(s.decode() not in logs for s in secrets.values()) and len(logs) > 0
    res["secret keys not in status"] = all(s.decode() not in json.dumps(status, default=str)
                                           for s in secrets.values())
    res["ZAP handshake denials logged"] = "DENIED" in logs
    return res
