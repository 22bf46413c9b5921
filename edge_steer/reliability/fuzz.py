"""Protocol fuzzing: hypothesis on the decoder and on a live daemon's whole command path, raw
multi-frame messages through a socket, and coverage-guided atheris in a child process
(`python -m edge_steer.reliability.fuzz --atheris-child ...`)."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import zmq

from edge_steer.reliability.cell import Cell
from edge_steer.runtime.protocol import ERROR_CODES


def payloads(max_bytes: int = 65536):
    """Hypothesis strategy: the inputs the issue names, weighted towards ones that reach the handler."""
    from hypothesis import strategies as st

    from edge_steer.runtime.protocol import SCHEMA, encode_request
    fields = sorted({f for spec in SCHEMA.values() for f in spec} | {"v", "cmd", "id"})
    scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
               | st.text(max_size=40) | st.binary(max_size=40))
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                                     max_size=4), max_leaves=12)
    valid = st.builds(lambda cmd, i, text, on, task: encode_request(
        cmd, id=i, **{"instruct": {"text": text}, "record": {"on": on}, "set_steering": {"task": task}}.get(cmd, {})),
        st.sampled_from(sorted(SCHEMA)), st.none() | st.integers(0, 2**31), st.text(min_size=1, max_size=30),
        st.booleans(), st.sampled_from(["", "nope", "../etc", "a\x00b", "."]))
    envelope = st.fixed_dictionaries({"v": st.just(1) | values, "cmd": st.sampled_from(sorted(SCHEMA)) | values},
                                     optional={k: values for k in fields if k not in ("v", "cmd")})
    return st.one_of(
        st.binary(max_size=1024),                                                        # random bytes
        st.tuples(valid, st.integers(0, 200)).map(lambda t: t[0][: max(0, len(t[0]) - 1 - t[1] % len(t[0]))]),
        st.tuples(valid, st.binary(min_size=1, max_size=8)).map(lambda t: t[0] + t[1]),  # trailing bytes
        st.tuples(valid, st.integers(0, 10**6), st.integers(0, 255)).map(               # one byte flipped
            lambda t: t[0][: t[1] % len(t[0])] + bytes([t[2]]) + t[0][t[1] % len(t[0]) + 1:]),
        st.integers(1, 4000).map(lambda d: b"\x91" * d + b"\xc0"),                        # deep nesting
        st.integers(1, 4000).map(lambda d: b"\x81\xa1k" * d + b"\xc0"),
        st.dictionaries(st.sampled_from(fields) | st.text(max_size=8), values, max_size=6).map(
            lambda m: msgpack.packb(m, use_bin_type=True)),                              # random maps
        envelope.map(lambda m: msgpack.packb(m, use_bin_type=True)),                      # valid-looking maps
        st.tuples(st.sampled_from(["text", "task", "id", "cmd", "v"]), st.integers(1000, max_bytes + 4096)).map(
            lambda t: msgpack.packb({"v": 1, "cmd": "instruct" if t[0] != "task" else "set_steering",
                                     t[0]: "x" * t[1]}, use_bin_type=True)),              # huge strings
        st.integers(max_bytes + 1, 2 * max_bytes).map(lambda n: b"\xc4" + b"\x00" * n),   # oversized
        values.map(lambda v: msgpack.packb({"v": v, "cmd": "status"}, use_bin_type=True)),  # unknown versions
        valid,
    )


def _snapshot(d) -> tuple:
    return (d.state, d.instruction, d.recording, d.steering, d.episode, d.fault_reason, id(d.setpoint.controller),
            d.setpoint.hold_reason, d.shutdown_requested.is_set())


@dataclass
class FuzzReport:
    tried: int = 0
    accepted: int = 0
    codes: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)   # (input hex, what went wrong)
    max_reply_bytes: int = 0

    def fail(self, data: bytes, why: str) -> None:
        if len(self.failures) < 20:
            self.failures.append((data[:64].hex() + ("..." if len(data) > 64 else ""), why))


def fuzz_decoder(examples: int, seed: int = 0) -> FuzzReport:
    """decode_request on its own: only ProtocolError (a code from the table) or a valid Request."""
    from hypothesis import HealthCheck, given, settings

    from edge_steer.runtime.protocol import SCHEMA, ProtocolError, decode_request
    rep = FuzzReport()

    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed == 0,
              suppress_health_check=list(HealthCheck))
    @given(payloads(4096))
    def run(data: bytes) -> None:
        rep.tried += 1
        try:
            req = decode_request(data, 4096)
        except ProtocolError as e:
            rep.codes[e.code] = rep.codes.get(e.code, 0) + 1
            if e.code not in ERROR_CODES or len(e.reason) > 2048:
                rep.fail(data, f"{e.code}: reason of {len(e.reason)} chars")
            return
        except Exception as e:  # noqa: BLE001 - what we are hunting for
            rep.fail(data, f"{type(e).__name__}: {e}")
            return
        rep.accepted += 1
        if req.cmd not in SCHEMA:
            rep.fail(data, f"accepted unknown command {req.cmd!r}")

    run()
    return rep


def fuzz_handler(cell: Cell, examples: int, seed: int = 0) -> FuzzReport:
    """The daemon's full command path (decode, validate, dispatch, reply) on a live sim daemon whose
    engine moves nothing: every input gets one decodable reply; a rejected one changes no state; the
    arm's setpoint never moves."""
    from hypothesis import HealthCheck, given, settings

    from edge_steer.runtime.protocol import Request
    d = cell.daemon
    cell.engine.mode = "still"
    rep = FuzzReport()
    p0 = np.array(d.setpoint.commanded[0])
    max_drift = [0.0]

    def restore() -> None:
        if d.state.value == "FAULT":
            d.handle(Request("recover", {}))
        elif d.state.value != "IDLE":
            d.handle(Request("stop", {}))
        if d.recording:
            d.handle(Request("record", {"on": False}))
        if d.steering is not None:
            d.handle(Request("set_steering", {}))
        d.shutdown_requested.clear()

    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed == 0,
              suppress_health_check=list(HealthCheck))
    @given(payloads(d.cfg.zmq.max_message_bytes))
    def run(data: bytes) -> None:
        rep.tried += 1
        before = _snapshot(d)
        try:
            raw = d.server.handle_bytes(data)
            reply = msgpack.unpackb(raw, raw=False)
        except Exception as e:  # noqa: BLE001
            rep.fail(data, f"handler raised {type(e).__name__}: {e}")
            return
        rep.max_reply_bytes = max(rep.max_reply_bytes, len(raw))
        if not (isinstance(reply, dict) and reply.get("v") == 1 and isinstance(reply.get("ok"), bool)):
            rep.fail(data, f"reply is not a protocol map: {reply!r:.80}")
            return
        if reply["ok"]:
            rep.accepted += 1
        else:
            code = reply.get("error")
            rep.codes[code] = rep.codes.get(code, 0) + 1
            if code not in ERROR_CODES:
                rep.fail(data, f"error code {code!r}: {reply.get('reason', '')[:120]}")
            if _snapshot(d) != before:
                rep.fail(data, f"rejected ({code}) but the daemon's state changed")
        if len(raw) > 4096 and not (reply["ok"] and "status" in data[:64].decode("latin-1")):
            rep.fail(data, f"reply of {len(raw)} bytes to a {len(data)}-byte request")
        max_drift[0] = max(max_drift[0], float(np.abs(np.array(d.setpoint.commanded[0]) - p0).max()))
        restore()

    try:
        run()
    finally:
        restore()
        cell.engine.mode = "ok"
    rep.codes["max_setpoint_drift_m"] = max_drift[0]
    if max_drift[0] > 1e-3:
        rep.fail(b"", f"setpoint moved {max_drift[0] * 1e3:.2f} mm during fuzzing")
    return rep


def fuzz_socket(endpoint: str, messages: int, seed: int = 0, timeout_ms: int = 3000,
                max_bytes: int = 65536) -> dict:
    """Random multi-frame messages through a raw DEALER: each gets exactly one reply (the ROUTER echoes
    the leading frames as its envelope). Then a frame over ZMQ's hard cap (4x the limit) drops the
    connection without a reply, and a fresh connection is served at once."""
    rng = random.Random(seed)
    from edge_steer.runtime.protocol import encode_request
    seeds = [encode_request("status", id=1), encode_request("instruct", text="x", start=False),
             encode_request("record", on=True), encode_request("pause")]
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    out = {"messages": 0, "answered": 0, "lost": 0, "bad_replies": 0, "codes": {}}

    def mutate(b: bytes) -> bytes:
        b = bytearray(b)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.4 and b:
                b[rng.randrange(len(b))] = rng.randrange(256)
            elif op < 0.7:
                b = b[: rng.randrange(len(b) + 1)]
            else:
                b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        return bytes(b)

    for _ in range(messages):
        kind = rng.random()
        if kind < 0.3:
            payload = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        elif kind < 0.9:
            payload = mutate(rng.choice(seeds))
        else:
            payload = rng.choice(seeds)
        frames = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 8))) for _ in range(rng.randint(0, 2))]
        s.send_multipart([*frames, payload])
        out["messages"] += 1
        if not s.poll(timeout_ms, zmq.POLLIN):
            out["lost"] += 1
            continue
        got = s.recv_multipart()
        try:
            reply = msgpack.unpackb(got[-1], raw=False)
            assert got[:-1] == frames and isinstance(reply, dict) and isinstance(reply["ok"], bool)
            out["answered"] += 1
            key = "ok" if reply["ok"] else reply["error"]
            out["codes"][key] = out["codes"].get(key, 0) + 1
        except Exception:  # noqa: BLE001
            out["bad_replies"] += 1
    s.send_multipart([b"", b"\x00" * (4 * max_bytes + 1)])
    out["over_cap_replied"] = bool(s.poll(500, zmq.POLLIN))
    s.close(linger=0)
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    s.send_multipart([b"", encode_request("status", id=2)])
    out["served_after_over_cap"] = bool(s.poll(timeout_ms, zmq.POLLIN))
    s.close(linger=0)
    return out


def run_atheris(runs: int, timeout_s: int = 300) -> dict:
    """Coverage-guided fuzzing of the decoder and the server's reply path in a child process."""
    try:
        import atheris  # noqa: F401
    except ImportError as e:
        return {"available": False, "reason": f"atheris not importable ({e}); pip install atheris"}
    corpus = Path(os.environ.get("TMPDIR", "/tmp")) / f"edge_steer_atheris_{os.getpid()}"
    corpus.mkdir(parents=True, exist_ok=True)
    from edge_steer.runtime.protocol import SCHEMA, encode_request
    for i, cmd in enumerate(sorted(SCHEMA)):
        args = {"instruct": {"text": "pick it"}, "record": {"on": True}, "set_steering": {"task": "t"}}.get(cmd, {})
        (corpus / f"seed{i}").write_bytes(encode_request(cmd, id=i, **args))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "edge_steer.reliability.fuzz", "--atheris-child", f"-runs={runs}", "-max_len=4096",
                        "-rss_limit_mb=1024", str(corpus)], capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - t0
    err = p.stderr
    done = [ln for ln in err.splitlines() if ln.startswith("Done ")]
    cov = [ln for ln in err.splitlines() if " cov: " in ln]
    crashed = p.returncode != 0 or "Uncaught Python exception" in err
    return {"available": True, "runs": runs, "returncode": p.returncode, "crashed": crashed, "wall_s": round(wall, 1),
            "done": done[-1] if done else None, "last_status": cov[-1].strip() if cov else None,
            "crash_output": err[-2000:] if crashed else None}


def _atheris_child(argv: list[str]) -> None:
    import atheris
    with atheris.instrument_imports(include=["edge_steer.runtime.protocol", "edge_steer.runtime.server"]):
        from edge_steer.runtime.config import ZmqConfig
        from edge_steer.runtime.protocol import ProtocolError, decode_request
        from edge_steer.runtime.server import CommandServer

    class Accept:
        def handle(self, req):
            return {"cmd": req.cmd, **req.args}

    server = CommandServer.__new__(CommandServer)  # the reply path only: no sockets
    server.cfg, server.daemon, server.requests, server.errors = ZmqConfig(max_message_bytes=1024), Accept(), 0, 0
    logging.disable(logging.CRITICAL)

    def one(data: bytes) -> None:
        try:
            decode_request(data, 1024)
        except ProtocolError:
            pass
        reply = msgpack.unpackb(server.handle_bytes(data), raw=False)
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise AssertionError(f"bad reply {reply!r}")
        if reply.get("error") == "internal":
            raise AssertionError(f"internal error: {reply.get('reason')}")

    atheris.Setup([sys.argv[0], *argv], one)
    atheris.Fuzz()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--atheris-child":
    _atheris_child(sys.argv[2:])
