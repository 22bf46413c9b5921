"""Reliability and security of the serve daemon: protocol fuzzing, injected faults, load, CURVE, and the
safety invariants (every setpoint recorded and checked, e-stop latency) — figures in docs/reliability.md.

    .venv/bin/python tools/bench_reliability.py [--seconds 10] [--fuzz 3000] [--atheris-runs 30000] [--motion process]

The harness is `edge_steer.reliability`; the test suite (tests/test_reliability*.py) calls the same
functions at small sizes. This entry point parses arguments, adds the machine header and writes the files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from _report import git_commit, this_machine

from edge_steer.reliability.report import BUGS, write_report
from edge_steer.reliability.suite import run_all

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str]) -> tuple[int, str]:
    from typer.testing import CliRunner

    from edge_steer.cli import app
    r = CliRunner().invoke(app, args)
    return r.exit_code, r.output


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0, help="per load level")
    ap.add_argument("--clients", default="0,1,8,32")
    ap.add_argument("--fuzz", type=int, default=3000, help="hypothesis examples per fuzz target")
    ap.add_argument("--atheris-runs", type=int, default=30000)
    ap.add_argument("--estops", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"))
    ap.add_argument("--json", default=str(ROOT / "docs" / "results" / "bench_reliability.json"))
    ap.add_argument("--report-only", action="store_true", help="rewrite --out from --json without running")
    ap.add_argument("--motion", choices=("process",), default="process",
                    help="where the setpoint stage runs: the robot's process (the daemon-thread mode is retired)")
    args = ap.parse_args()
    if args.report_only:
        r = json.loads(Path(args.json).read_text())
        write_report(r, Path(args.out), r["command"])
        return
    logging.basicConfig(level="ERROR", stream=sys.stderr)
    t_start = time.perf_counter()
    head = {"commit": git_commit(), "machine": this_machine(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()}
    r = {**head, **run_all(Path(tempfile.mkdtemp(prefix="edge_steer_rel_")), run_cli, seconds=args.seconds,
                           clients=tuple(int(x) for x in args.clients.split(",")), fuzz=args.fuzz,
                           atheris_runs=args.atheris_runs, estops=args.estops)}
    r["bugs"] = BUGS
    r["loadavg_end"] = os.getloadavg()
    r["wall_s"] = time.perf_counter() - t_start
    r["command"] = (".venv/bin/python tools/bench_reliability.py " + " ".join(sys.argv[1:])).strip()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(r, indent=1, default=str) + "\n")
    write_report(r, Path(args.out), r["command"])
    print(json.dumps({k: r[k] for k in ("estop", "setpoints")}, indent=1, default=str))


if __name__ == "__main__":
    main()
