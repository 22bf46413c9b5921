"""Authenticated remote control (issue 8): CURVE keys from the CLI, who gets an effect, secrets kept
out of the logs, the config's refusals, and the systemd unit's privileges."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_steer.cli import app
from edge_steer.runtime.config import ConfigError, ServeConfig

ROOT = Path(__file__).resolve().parent.parent
from edge_steer.reliability.cell import _try, start_cell
from edge_steer.reliability.security import curve_checks, make_keys
from edge_steer.runtime.launch import wait_for

pytestmark = pytest.mark.timeout(120)


def run_cli(args: list[str]) -> tuple[int, str]:
    r = CliRunner().invoke(app, args)
    return r.exit_code, r.output


def test_keys_generate_writes_a_private_secret_and_refuses_to_overwrite(tmp_path):
    r = CliRunner().invoke(app, ["keys", "generate", "--out", str(tmp_path / "k"), "--name", "server"])
    assert r.exit_code == 0, r.output
    secret = tmp_path / "k" / "server.key_secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and (tmp_path / "k" / "server.key").is_file()
    assert "secret-key" in secret.read_text() and "secret-key" not in (tmp_path / "k" / "server.key").read_text()
    r = CliRunner().invoke(app, ["keys", "generate", "--out", str(tmp_path / "k"), "--name", "server"])
    assert r.exit_code == 2 and "exists already" in r.output
    r = CliRunner().invoke(app, ["keys", "generate", "--out", str(tmp_path / "k"), "--name", "../x"])
    assert r.exit_code == 2


def test_curve_only_the_allowed_client_gets_an_effect_and_secrets_are_never_logged(tmp_path):
    res = curve_checks(tmp_path, run_cli)
    assert all(v is True for v in res.values()), res


def test_config_binds_remote_only_with_curve_and_refuses_a_readable_secret(tmp_path):
    keys = make_keys(tmp_path / "k", "server", cli=run_cli)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    with pytest.raises(ConfigError, match="CURVE"):
        ServeConfig.sim().with_(zmq={"command": "tcp://0.0.0.0:5555"})
    curve = {"curve_secret_key": str(keys["server"][1]), "curve_authorized_keys": str(allowed)}
    assert ServeConfig.sim().with_(zmq={"command": "tcp://0.0.0.0:5555", **curve}).zmq.curve
    keys["server"][1].chmod(0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        ServeConfig.sim().with_(zmq={"command": "tcp://0.0.0.0:5555", **curve})
    assert ServeConfig.sim().zmq.command.startswith("tcp://127.0.0.1:")  # localhost by default


def test_systemd_unit_is_unprivileged_except_for_rt_limits():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(ROOT / "systemd" / "edge-steer.service")
    svc = unit["Service"]
    assert svc["User"] == "edge-steer" and svc["Group"] == "edge-steer"
    assert svc["NoNewPrivileges"] == "yes" and svc["CapabilityBoundingSet"] == "" and svc["AmbientCapabilities"] == ""
    assert svc["LimitRTPRIO"] and svc["LimitMEMLOCK"] == "infinity"
    assert "CPUSchedulingPolicy" not in svc  # libfranka raises its own thread; the rest stays SCHED_OTHER
    assert svc.get("RestrictRealtime", "no") == "no" and svc["ProtectSystem"] == "strict"
    assert "PermissionsStartOnly" not in svc and svc.get("PrivilegedStartUp", "") == ""


def test_only_operators_move_the_arm_but_anyone_allowed_can_stop_it(tmp_path):
    import zmq.auth

    from edge_steer.client import Client, ClientError
    keys = make_keys(tmp_path / "keys", "server", "operator", "observer", cli=run_cli)
    allowed, operators = tmp_path / "allowed", tmp_path / "operators"
    allowed.mkdir()
    operators.mkdir()
    for name in ("operator", "observer"):
        (allowed / f"{name}.key").write_bytes(keys[name][0].read_bytes())
    (operators / "operator.key").write_bytes(keys["operator"][0].read_bytes())
    cell = start_cell(tmp_path, curve={"curve_secret_key": str(keys["server"][1]),
                                           "curve_authorized_keys": str(allowed),
                                           "curve_operator_keys": str(operators)})
    d, z = cell.daemon, cell.daemon.cfg.zmq
    server_pub = zmq.auth.load_certificate(keys["server"][0])[0]
    clients = {n: Client(z.command, z.telemetry, timeout_ms=5000, server_public_key=server_pub,
                         client_certificate=str(keys[n][1])) for n in ("operator", "observer")}
    obs, op = clients["observer"], clients["operator"]
    try:
        for call in (lambda: obs.instruct("put the red cube on the blue plate"), obs.start, obs.recover,
                     lambda: obs.record(True), obs.shutdown):
            with pytest.raises(ClientError, match="forbidden"):
                call()
        assert obs.status()["state"] == "IDLE"                        # nothing moved
        assert op.instruct("put the red cube on the blue plate")["state"] == "RUNNING"
        obs.estop()                                                    # an observer can still stop the arm
        assert op.status()["state"] == "FAULT"
        with pytest.raises(ClientError, match="forbidden"):
            obs.recover()
        wait_for(lambda: _try(op.recover), timeout=10, step=0.2)
        assert obs.status()["state"] == "IDLE"
    finally:
        for c in clients.values():
            c.close()
        d.close()


def test_operator_keys_need_curve(tmp_path):
    (tmp_path / "ops").mkdir()
    with pytest.raises(ConfigError, match="needs CURVE"):
        ServeConfig.sim().with_(zmq={"curve_operator_keys": str(tmp_path / "ops")})
