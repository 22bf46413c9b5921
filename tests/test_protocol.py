"""The protocol as docs/protocol.md states it, without a daemon: ids echoed in every reply where they
can be read, control characters refused, every telemetry key present, and the example config listing
every key the config dataclasses have."""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path

import msgpack
import numpy as np
import pytest

from edge_steer.runtime.config import ServeConfig, ZmqConfig
from edge_steer.runtime.protocol import MAX_ID, SCHEMA, decode_request
from edge_steer.runtime.server import CommandServer
from edge_steer.runtime.statemachine import Refused
from edge_steer.runtime.telemetry import TELEMETRY_KEYS, telemetry_message

DOCS = Path(__file__).resolve().parents[1] / "docs"
LIMIT = 4096


class Refuses:
    """A daemon that refuses every command it is handed (so the error comes from the handler)."""

    def handle(self, req):
        raise Refused("bad_state", f"{req.cmd} refused")


@pytest.fixture(scope="module")
def server():
    srv = CommandServer(ZmqConfig(max_message_bytes=LIMIT), Refuses())
    yield srv
    srv.ctx.term()


def _reply(server, payload: bytes) -> dict:
    return msgpack.unpackb(server.handle_bytes(payload), raw=False)


@pytest.mark.parametrize("rid", [7, "req-7"])
@pytest.mark.parametrize("msg, code", [
    ({"v": 1, "cmd": "fly"}, "unknown_command"),
    ({"v": 2, "cmd": "status"}, "bad_version"),
    ({"cmd": "status"}, "bad_version"),
    ({"v": 1, "cmd": "instruct", "text": 3}, "bad_field"),
    ({"v": 1, "cmd": "instruct"}, "bad_field"),
    ({"v": 1, "cmd": "status", "extra": 1}, "bad_field"),
    ({"v": 1, "cmd": 5}, "bad_field"),
    ({"v": 1, "cmd": "instruct", "text": "x" * (2 * LIMIT)}, "too_large"),
    ({"v": 1, "cmd": "start"}, "bad_state"),
])
def test_every_error_reply_echoes_a_readable_id(server, msg, code, rid):
    r = _reply(server, msgpack.packb({**msg, "id": rid}))
    assert r["ok"] is False and r["error"] == code and r["id"] == rid, r
    assert set(r) == {"v", "id", "ok", "error", "reason"}


@pytest.mark.parametrize("payload", [b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"v": 1, "cmd": "status", "id": 1.5}),
                                     msgpack.packb({"v": 1, "cmd": "status", "id": True}),
                                     msgpack.packb({"v": 1, "cmd": "status", "id": "x" * (MAX_ID + 1)}),
                                     b"\x81" * 5000])
def test_an_unreadable_id_is_null(server, payload):
    r = _reply(server, payload)
    assert r["ok"] is False and r["id"] is None and r["error"] in ("malformed", "bad_field", "too_large"), r


@pytest.mark.parametrize("ch", ["\x00", "\x1b", "\x7f", "\x85", "\x9f"])
def test_control_characters_in_text_are_refused_del_and_c1_included(ch):
    from edge_steer.runtime.protocol import ProtocolError
    with pytest.raises(ProtocolError, match="control characters") as e:
        decode_request(msgpack.packb({"v": 1, "cmd": "instruct", "text": f"go{ch}on", "id": 3}), LIMIT)
    assert e.value.id == 3
    ok = decode_request(msgpack.packb({"v": 1, "cmd": "instruct", "text": "put the cube on the plate — gently ✓"}), LIMIT)
    assert ok.args["text"].endswith("✓")


def test_strings_must_be_msgpack_str_not_bin():
    from edge_steer.runtime.protocol import ProtocolError
    with pytest.raises(ProtocolError, match="bad_field"):
        decode_request(msgpack.packb({"v": 1, "cmd": "instruct", "text": b"go"}, use_bin_type=True), LIMIT)


def test_every_command_in_the_schema_is_documented_with_its_result():
    doc = (DOCS / "protocol.md").read_text()
    for cmd in SCHEMA:
        assert f"| `{cmd}` |" in doc, f"{cmd} missing from the command table"
    results = doc.split("## Results", 1)[1].split("\n## ", 1)[0]
    for cmd in SCHEMA:
        assert f"`{cmd}`" in results, f"{cmd}'s result shape is not documented"


class _Setpoint:
    commanded = ([0.4, 0.0, 0.3], (1.0, 0.0, 0.0, 0.0))
    hold_reason, segment, missed_ticks = "idle", 0, 0


def test_every_documented_telemetry_key_is_present_before_the_first_chunk_and_reading():
    m = telemetry_message(1, "IDLE", _Setpoint(), None, None, 0, None)
    assert tuple(m) == TELEMETRY_KEYS
    assert m["chunk"] is None and m["inference_ms"] is None and m["tcp"] is None
    m = telemetry_message(2, "RUNNING", _Setpoint(), None, np.zeros((10, 7)), 1, 12.5)
    assert tuple(m) == TELEMETRY_KEYS and len(m["chunk"]) == 10
    block = (DOCS / "protocol.md").read_text().split("## Telemetry", 1)[1].split("```")[1]
    assert set(re.findall(r'"(\w+)":', block)) == set(TELEMETRY_KEYS)


def _keys(cls, prefix: str) -> set[str]:
    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out |= _keys(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            out |= _keys(typing.get_args(tp)[0], f"{prefix}{f.name}.")
        else:
            out.add(prefix + f.name)
    return out


def _toml_keys(raw: dict, prefix: str) -> set[str]:
    out = set()
    for k, v in raw.items():
        if isinstance(v, dict):
            out |= _toml_keys(v, f"{prefix}{k}.")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for t in v:
                out |= _toml_keys(t, f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


def test_the_example_config_lists_every_key_and_loads():
    """Every key of every config dataclass appears in docs/serve.example.toml, set or commented out
    (`# key = value`), and the file as written loads."""
    text = (DOCS / "serve.example.toml").read_text()
    # commented keys count as listed: uncomment lines shaped `# key = value` under their table
    uncommented = re.sub(r"(?m)^# ?(\w+ = )", r"\1", text)
    listed = _toml_keys(tomllib.loads(uncommented), "")
    missing = sorted(_keys(ServeConfig, "") - listed)
    assert not missing, f"docs/serve.example.toml does not list {missing}"
    unknown = sorted(listed - _keys(ServeConfig, ""))
    assert not unknown, f"docs/serve.example.toml lists keys the config does not have: {unknown}"
    from edge_steer.runtime.config import _build
    cfg = _build(ServeConfig, tomllib.loads(text), "")
    assert cfg.zmq.max_message_bytes == 65536


def test_every_error_code_is_in_the_doc_table():
    from edge_steer.runtime.protocol import ERROR_CODES
    table = (DOCS / "protocol.md").read_text().split("| error code | when |", 1)[1].split("\n\n", 1)[0]
    missing = sorted(c for c in ERROR_CODES if f"`{c}`" not in table)
    assert not missing, f"error codes not documented: {missing}"
