"""Python client for the `edge-steer serve` daemon (protocol: docs/protocol.md).

    from edge_steer.client import Client
    with Client() as c:
        c.instruct("put the red cube on the blue plate")
        print(c.status()["state"])
        for msg in c.telemetry(max_messages=10):
            print(msg["tcp"])

A DEALER socket with a timeout per request: a daemon that is down or busy gives a `ClientTimeout`
instead of a hung caller, and the socket is rebuilt so the next request starts clean.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import zmq

from edge_steer.runtime.protocol import (SLOW_COMMANDS, SLOW_REPLY_MS, TELEMETRY_TOPIC, decode_reply, decode_telemetry,
                                        encode_request)

DEFAULT_COMMAND = "tcp://127.0.0.1:5555"
DEFAULT_TELEMETRY = "tcp://127.0.0.1:5556"


class ClientError(RuntimeError):
    """The daemon answered with an error: `code` and `reason` say which and why."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


class ClientTimeout(TimeoutError):
    pass


class Client:
    def __init__(self, endpoint: str = DEFAULT_COMMAND, telemetry_endpoint: str = DEFAULT_TELEMETRY,
                 timeout_ms: int = 3000, server_public_key: bytes | None = None,
                 client_certificate: str | None = None):
        """For a CURVE-protected daemon pass its public key (z85) and this client's secret
        certificate file (zmq.auth format); the daemon must list the client's public key."""
        self.endpoint, self.telemetry_endpoint, self.timeout_ms = endpoint, telemetry_endpoint, timeout_ms
        self._server_key = server_public_key
        self._cert = client_certificate
        self._ctx = zmq.Context()
        self._ids = itertools.count(1)
        self._sock: zmq.Socket | None = None

    def _secure(self, sock: zmq.Socket) -> None:
        if self._server_key is None:
            return
        if not self._cert:
            raise ValueError("a CURVE server key needs client_certificate (a zmq.auth secret certificate file)")
        import zmq.auth
        public, secret = zmq.auth.load_certificate(self._cert)
        sock.curve_serverkey = self._server_key
        sock.curve_publickey, sock.curve_secretkey = public, secret

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            self._secure(s)
            s.connect(self.endpoint)
            self._sock = s
        return self._sock

    def request_raw(self, payload: bytes, timeout_ms: int | None = None) -> dict[str, Any]:
        """Send pre-encoded bytes (tests, fuzzing) and return the decoded reply map."""
        sock = self._socket()
        sock.send_multipart([b"", payload])
        if not sock.poll(timeout_ms if timeout_ms is not None else self.timeout_ms, zmq.POLLIN):
            sock.close(linger=0)  # a late reply must not be read as the answer to the next request
            self._sock = None
            raise ClientTimeout(f"no reply from {self.endpoint} within {timeout_ms or self.timeout_ms} ms")
        frames = sock.recv_multipart()
        return decode_reply(frames[-1])

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """One command; returns its result map or raises ClientError with the daemon's reason."""
        rid = next(self._ids)
        timeout = max(self.timeout_ms, SLOW_REPLY_MS) if cmd in SLOW_COMMANDS else self.timeout_ms
        reply = self.request_raw(encode_request(cmd, id=rid, **args), timeout)
        if reply.get("id") not in (rid, None):
            raise ClientError("protocol", f"reply id {reply.get('id')} does not match request {rid}")
        if not reply["ok"]:
            raise ClientError(reply.get("error", "error"), reply.get("reason", ""))
        return reply.get("result", {})

    # ---- commands --------------------------------------------------------------------------------
    def instruct(self, text: str, start: bool = True) -> dict:
        return self.request("instruct", text=text, start=start)

    def start(self) -> dict:
        return self.request("start")

    def pause(self) -> dict:
        return self.request("pause")

    def stop(self) -> dict:
        return self.request("stop")

    def estop(self) -> dict:
        return self.request("estop")

    def recover(self) -> dict:
        return self.request("recover")

    def reset(self) -> dict:
        """Sim: a fresh scene (IDLE only); its result says which: {"state", "task", "seed", "scene"}."""
        return self.request("reset")

    def status(self) -> dict:
        return self.request("status")

    def set_steering(self, task: str | None) -> dict:
        return self.request("set_steering", task=task or "")

    def record(self, on: bool) -> dict:
        return self.request("record", on=on)

    def shutdown(self) -> dict:
        return self.request("shutdown")

    # ---- telemetry ---------------------------------------------------------------------------------
    def telemetry(self, max_messages: int | None = None, timeout_ms: int = 2000) -> Iterator[dict[str, Any]]:
        """Telemetry messages as they arrive; stops after max_messages or a silence of timeout_ms."""
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        self._secure(sub)
        sub.setsockopt(zmq.SUBSCRIBE, TELEMETRY_TOPIC)
        sub.connect(self.telemetry_endpoint)
        try:
            n = 0
            while max_messages is None or n < max_messages:
                if not sub.poll(timeout_ms, zmq.POLLIN):
                    return
                yield decode_telemetry(sub.recv_multipart())
                n += 1
        finally:
            sub.close(linger=0)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
