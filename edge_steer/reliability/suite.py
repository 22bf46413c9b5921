"""Every reliability check in one run, at the sizes given: the figures of docs/reliability.md."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

from edge_steer.reliability.cell import start_cell
from edge_steer.reliability.faults import kill_while_recording, run_faults
from edge_steer.reliability.fuzz import fuzz_decoder, fuzz_handler, fuzz_socket, run_atheris
from edge_steer.reliability.load import _keep_working, estop_latency, load_level
from edge_steer.reliability.security import RunCli, curve_checks


def run_all(tmp: Path, cli: RunCli, *, seconds: float = 10.0, clients: tuple[int, ...] = (0, 1, 8, 32),
            fuzz: int = 3000, atheris_runs: int = 30000, estops: int = 30) -> dict[str, Any]:
    def say(what: str) -> None:
        print(what, file=sys.stderr)

    r: dict[str, Any] = {"seconds": seconds}
    say("fuzzing the decoder")
    r["fuzz_decoder"] = fuzz_decoder(fuzz).__dict__
    say("atheris")
    r["atheris"] = run_atheris(atheris_runs)
    r["motion"] = "process"
    cell = start_cell(tmp)
    try:
        say("fuzzing the live handler and socket")
        r["fuzz_handler"] = fuzz_handler(cell, fuzz).__dict__
        r["fuzz_socket"] = fuzz_socket(cell.endpoint, max(200, fuzz // 3))
        say("injecting faults")
        r["faults"] = [f.__dict__ for f in run_faults(cell)]
        say("load")
        stop = threading.Event()
        worker = _keep_working(cell, stop)
        r["load"] = []
        for n in clients:
            say(f"  {n} clients")
            r["load"].append(load_level(cell, n, seconds))
        stop.set()
        worker.join(timeout=15)
        say("e-stop latency")
        r["estop"] = estop_latency(cell, estops, background_clients=8)
        r["setpoints"] = cell.log.check(cell.daemon.cfg.safety, 1.0 / cell.daemon.cfg.rates.control_hz)
    finally:
        cell.close()
    say("killing the daemon while recording")
    r["kills"] = []
    for sig, expected in ((signal.SIGTERM, "exit 0; the open episode committed; restart appends"),
                          (signal.SIGKILL, "completed episode kept, no partial one; restart appends")):
        try:
            res = kill_while_recording(tmp, sig)
            a, b = res["after_kill"], res["after_restart"]
            want = 2 if sig == signal.SIGTERM else 1
            ok = (a["episodes"] == want and (sig != signal.SIGTERM or a["exit_code"] == 0)
                  and b["episodes"] == want + 1 and b["indices"] == list(range(want + 1))
                  and b["readable_frames"] == b["frames"] > 0)
        except Exception as e:  # noqa: BLE001
            res, ok = {"signal": signal.Signals(sig).name, "error": repr(e),
                       "after_kill": {}, "after_restart": {}}, False
        r["kills"].append({"result": res, "expected": expected, "survived": ok})
    say("CURVE")
    r["security"] = curve_checks(tmp / "curve", cli)
    return r
