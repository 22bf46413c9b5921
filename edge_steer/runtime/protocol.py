"""The command protocol's schema: msgpack maps with a version field, one reply per request.

Shared by the daemon (decoding, validation) and `edge_steer.client` (encoding); imports nothing but
msgpack so the client stays light. See docs/protocol.md for the wire format.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any

import msgpack

VERSION = 1
MAX_TEXT = 1000         # characters of an instruction
MAX_NAME = 200          # characters of a steering task name
MAX_ID = 128            # characters of a string request id (echoed in the reply)

# command -> {field: (type, required)}
SCHEMA: dict[str, dict[str, tuple[type, bool]]] = {
    "instruct": {"text": (str, True), "start": (bool, False)},
    "start": {},
    "pause": {},
    "stop": {},
    "estop": {},
    "recover": {},
    "reset": {},                                # sim: a fresh scene (IDLE only)
    "status": {},
    "set_steering": {"task": (str, False)},     # absent or "" -> the base model
    "record": {"on": (bool, True)},
    "shutdown": {},
}
ENVELOPE = {"v", "cmd", "id"}
# commands whose reply may take seconds: in sim, `instruct` (a new episode in a fresh scene) and `reset`
# reopen the cell (2-4 s on 2 cores), `recover` restarts the controller. Clients wait this long for them.
SLOW_COMMANDS = frozenset({"instruct", "reset", "recover"})
SLOW_REPLY_MS = 20_000
# what any authenticated client may send: look, or make the arm stop. The rest can move the arm, and
# with zmq.curve_operator_keys set only operators may send it (anyone must be able to stop a robot)
OBSERVER_COMMANDS = frozenset({"status", "pause", "stop", "estop"})


# every error code a reply may carry (docs/protocol.md, Replies); "internal" is a bug, so not listed
ERROR_CODES = frozenset({"malformed", "too_large", "bad_version", "unknown_command", "bad_field", "bad_state",
                         "no_instruction", "no_steering", "steering_failed", "recover_failed", "not_sim",
                         "scene_failed", "forbidden"})


class ProtocolError(ValueError):
    """A refused request; `id` is the request's id where it could be read (echoed in the error reply)."""

    def __init__(self, code: str, reason: str, id: Any = None):
        super().__init__(f"{code}: {reason}")
        self.code, self.reason, self.id = code, reason, id


@dataclass(frozen=True)
class Request:
    cmd: str
    args: dict[str, Any]
    id: Any = None


def encode_request(cmd: str, id: Any = None, **args: Any) -> bytes:
    msg = {"v": VERSION, "cmd": cmd, **args}
    if id is not None:
        msg["id"] = id
    return msgpack.packb(msg, use_bin_type=True)


def decode_request(data: bytes, max_bytes: int) -> Request:
    """Bytes -> validated Request, or ProtocolError with a code, a reason the operator can act on, and
    the request's id wherever it can be read (so a client can match the error to its request)."""
    if len(data) > max_bytes:
        raise ProtocolError("too_large", f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit",
                            _readable_id(data))
    msg = _unpack(data, max_bytes)
    rid = msg.get("id")
    if not _valid_id(rid):
        raise ProtocolError("bad_field", f"id must be an integer or a string of at most {MAX_ID} characters")
    try:
        return _validate(msg)
    except ProtocolError as e:
        e.id = rid
        raise


def _unpack(data: bytes, max_bytes: int) -> dict:
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=max_bytes,
                              max_bin_len=max_bytes, max_array_len=64, max_map_len=32, max_ext_len=0)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as e:
        raise ProtocolError("malformed", f"not a single msgpack message: {type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - whatever the decoder raises, the sender gets a reason
        raise ProtocolError("malformed", f"undecodable message: {type(e).__name__}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("malformed", f"a request is a map, got {type(msg).__name__}")
    return msg


def _valid_id(rid: Any) -> bool:
    """None (no id), an integer (not a bool), or a string short enough to echo: a reply must not grow
    with the request."""
    if rid is None or type(rid) is int:
        return True
    return isinstance(rid, str) and len(rid) <= MAX_ID


def _readable_id(data: bytes) -> Any:
    """The id of an oversize request, if it is a well-formed map with a valid id (ZMQ has already
    dropped anything above 4x the limit, so this decode is bounded); else None."""
    try:
        msg = _unpack(data, len(data))
    except ProtocolError:
        return None
    rid = msg.get("id")
    return rid if _valid_id(rid) else None


def _validate(msg: dict) -> Request:
    rid = msg.get("id")
    if "v" not in msg:
        raise ProtocolError("bad_version", f"missing version field 'v' (this daemon speaks v{VERSION})")
    if type(msg["v"]) is not int or msg["v"] != VERSION:  # 1.0 and true are not versions
        # the sender's value is echoed cut short: a reply must not grow with the request
        raise ProtocolError("bad_version", f"protocol version {repr(msg['v'])[:40]} not supported "
                                           f"(this daemon speaks v{VERSION})")
    cmd = msg.get("cmd")
    if not isinstance(cmd, str):
        raise ProtocolError("bad_field", "cmd must be a string")
    if cmd not in SCHEMA:
        raise ProtocolError("unknown_command", f"unknown command {cmd[:40]!r}; known: {sorted(SCHEMA)}")
    spec = SCHEMA[cmd]
    args = {k: v for k, v in msg.items() if k not in ENVELOPE}
    extra = sorted(set(args) - set(spec))
    if extra:
        raise ProtocolError("bad_field", f"{cmd} takes no field(s) {[str(e)[:40] for e in extra]}; "
                                         f"fields: {sorted(spec) or 'none'}")
    for name, (tp, required) in spec.items():
        if name not in args:
            if required:
                raise ProtocolError("bad_field", f"{cmd} needs field {name!r} ({tp.__name__})")
            continue
        v = args[name]
        if not isinstance(v, tp) or (tp is not bool and isinstance(v, bool)):
            raise ProtocolError("bad_field", f"{cmd}.{name} must be {tp.__name__}, got {type(v).__name__}")
    if cmd == "instruct":
        text = args["text"].strip()
        if not text:
            raise ProtocolError("bad_field", "instruct.text is empty")
        if len(text) > MAX_TEXT:
            raise ProtocolError("bad_field", f"instruct.text longer than {MAX_TEXT} characters")
        if any(unicodedata.category(ch) == "Cc" for ch in text):   # C0, DEL (0x7f) and C1
            raise ProtocolError("bad_field", "instruct.text contains control characters")
        args["text"] = text
    if cmd == "set_steering" and len(args.get("task", "")) > MAX_NAME:
        raise ProtocolError("bad_field", f"set_steering.task longer than {MAX_NAME} characters")
    return Request(cmd, args, rid)


def ok_reply(rid: Any, result: dict[str, Any] | None = None) -> bytes:
    return msgpack.packb({"v": VERSION, "id": rid, "ok": True, "result": result or {}}, use_bin_type=True)


def error_reply(rid: Any, code: str, reason: str) -> bytes:
    return msgpack.packb({"v": VERSION, "id": rid, "ok": False, "error": code, "reason": reason}, use_bin_type=True)


def decode_reply(data: bytes) -> dict[str, Any]:
    msg = msgpack.unpackb(data, raw=False)
    if not isinstance(msg, dict) or "ok" not in msg:
        raise ProtocolError("malformed", "reply is not a protocol map")
    return msg


TELEMETRY_TOPIC = b"telemetry"


def encode_telemetry(msg: dict[str, Any]) -> list[bytes]:
    return [TELEMETRY_TOPIC, msgpack.packb(msg, use_bin_type=True)]


def decode_telemetry(frames: list[bytes]) -> dict[str, Any]:
    return msgpack.unpackb(frames[-1], raw=False)
