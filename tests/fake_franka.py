"""A `connect` for the panda backend's robot process (runtime/panda_process.py) that refuses, as
libfranka does when no arm answers, saying what it was asked."""


def refuse(host: str, enforce_realtime: bool):
    raise RuntimeError(f"no arm answers at {host} (enforce_realtime={enforce_realtime})")
