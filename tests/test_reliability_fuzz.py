"""Protocol fuzzing (issue 8): the decoder alone, the live daemon's command path, and the ROUTER socket.
Sizes are small here; tools/bench_reliability.py runs the same functions longer (docs/reliability.md)."""

from __future__ import annotations

import msgpack
import pytest

from edge_steer.runtime.protocol import ProtocolError, decode_request, encode_request

from edge_steer.reliability.cell import start_cell
from edge_steer.reliability.fuzz import fuzz_decoder, fuzz_handler, fuzz_socket

pytestmark = pytest.mark.timeout(180)


def test_decoder_fuzz_only_documented_errors():
    rep = fuzz_decoder(300)
    assert rep.tried == 300 and not rep.failures, rep.failures
    assert {"malformed", "bad_version", "bad_field", "too_large"} <= set(rep.codes)  # the generator reaches them


# ---- regressions for what the fuzzer found ---------------------------------------------------------
@pytest.mark.parametrize("field", ["v", "id"])
def test_a_huge_version_or_id_is_not_echoed_back(field):
    msg = {"v": 1, "cmd": "status", field: "x" * 60000}
    with pytest.raises(ProtocolError) as e:
        decode_request(msgpack.packb(msg), 65536)
    assert len(e.value.reason) < 200


@pytest.mark.parametrize("v", [1.0, True, "1", [1]])
def test_version_must_be_the_integer_1(v):
    with pytest.raises(ProtocolError, match="bad_version"):
        decode_request(msgpack.packb({"v": v, "cmd": "status"}), 65536)
    assert decode_request(encode_request("status", id="x" * 128), 65536).id == "x" * 128


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    c = start_cell(tmp_path_factory.mktemp("fuzz"))
    yield c
    c.close()


def test_live_handler_fuzz_never_crashes_moves_or_changes_state_on_rejection(cell):
    rep = fuzz_handler(cell, 150)
    assert rep.tried == 150 and not rep.failures, rep.failures
    assert rep.codes["max_setpoint_drift_m"] < 1e-3
    assert cell.client.status()["state"] == "IDLE"


def test_socket_fuzz_every_message_gets_one_reply_and_over_cap_drops_only_that_peer(cell):
    out = fuzz_socket(cell.endpoint, 80)
    assert out["answered"] == out["messages"] == 80 and out["bad_replies"] == 0, out
    assert out["over_cap_replied"] is False and out["served_after_over_cap"] is True
    assert cell.daemon.server._thread.is_alive()
