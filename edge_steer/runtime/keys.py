"""CURVE key pairs for remote control of the daemon (zmq.auth certificate format)."""

from __future__ import annotations

import os
from pathlib import Path


def write_key_pair(out: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public, 644) and NAME.key_secret (600) into `out`; the paths. Refuses (ValueError)
    a name that is not a plain identifier and a pair that is there already, rather than replace it."""
    import zmq.auth

    if not name.isidentifier():
        raise ValueError(f"name must be a plain name, got {name!r}")
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise ValueError(f"{public} or {secret} exists already; remove it to replace the key pair")
    out.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)  # the secret is never world-readable, not even for an instant
    try:
        zmq.auth.create_certificates(str(out), name)
    finally:
        os.umask(old)
    secret.chmod(0o600)
    public.chmod(0o644)
    return public, secret
