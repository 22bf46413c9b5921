"""`edge-steer serve`: configure logging and signals, run the daemon until shutdown or SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from edge_steer.runtime.config import ServeConfig


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
    daemon.serve_forever()
    return 0
