"""systemd's sd_notify protocol (READY=1, WATCHDOG=1, STATUS=..., STOPPING=1) without libsystemd.

A datagram to $NOTIFY_SOCKET; a no-op when the daemon is not started by systemd with Type=notify.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace socket
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError:
        return False
