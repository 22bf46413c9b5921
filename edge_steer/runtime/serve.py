"""`edge-steer serve`: configure logging and signals, run the daemon until shutdown or SIGTERM."""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
import threading

from edge_steer.runtime.config import ServeConfig

# Below systemd's TimeoutStopSec=15s (systemd/edge-steer.service): a shutdown that hangs (a stuck device
# call, a thread that will not end, a ZMQ context with a socket left open) dumps every thread's stack into
# the log and exits 1 itself, so the journal says where it hung instead of just recording a SIGKILL.
STOP_DEADLINE_S = 12.0


def run(cfg: ServeConfig) -> int:
    logging.basicConfig(level=cfg.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Python's default 5 ms GIL switch interval would let a busy thread delay the 1 kHz setter by
    # several periods; 0.5 ms bounds that wait. Process-wide, so it is set here, by the entry point.
    sys.setswitchinterval(0.0005)
    from edge_steer.runtime.daemon import Daemon

    daemon = Daemon(cfg).start()

    def on_signal(signum, _frame):
        logging.getLogger("edge_steer.serve").info("signal %s: shutting down", signal.Signals(signum).name)
        daemon.shutdown_requested.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    while not daemon.shutdown_requested.wait(0.1):  # a timed wait, so the handlers above get to run
        pass
    stop_within(STOP_DEADLINE_S)
    try:
        daemon.close()
    finally:
        faulthandler.cancel_dump_traceback_later()
    return 0


def stop_within(seconds: float) -> None:
    """Arm the shutdown deadline: after `seconds`, write all threads' tracebacks to stderr and exit 1."""
    faulthandler.dump_traceback_later(seconds, exit=True, file=sys.stderr)
