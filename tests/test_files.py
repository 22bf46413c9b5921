"""Durable writes: a kill or an error mid-save leaves the previous file whole and no temp file behind."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

import edge_steer.files as files
from edge_steer.files import atomic_path, atomic_write, atomic_write_bytes, file_sha256
from edge_steer.models import CheckpointError, EdgeVLA
from edge_steer.steering.delta import SteeringDelta
from steering_fixtures import tiny_model


class Killed(BaseException):
    """Stands for a SIGKILL / power cut: not an Exception, so no writer's handler swallows it."""


def kill_on_rename(monkeypatch, which: int = 1) -> None:
    """Make the `which`-th rename (the commit of a write) die: the new bytes are on disk, not yet in place."""
    real, seen = os.replace, []

    def replace(src, dst):
        seen.append(dst)
        if len(seen) == which:
            raise Killed
        real(src, dst)
    monkeypatch.setattr(files.os, "replace", replace)


def test_a_failed_or_killed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    p = tmp_path / "sub" / "state.bin"
    atomic_write_bytes(p, b"old")                       # creates the directory too
    assert p.read_bytes() == b"old"

    def torn(f):
        f.write(b"ne")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(p, torn)
    with pytest.raises(FileNotFoundError, match="left nothing"):
        with atomic_path(p):
            pass                                        # a writer that wrote nothing commits nothing
    kill_on_rename(monkeypatch)
    with pytest.raises(Killed):
        atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old"
    assert sorted(f.name for f in p.parent.iterdir()) == ["state.bin"]
    monkeypatch.undo()
    atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"new" and file_sha256(p) == hashlib.sha256(b"new").hexdigest()


def test_a_model_saved_over_survives_a_kill_or_refuses_to_load_a_mix(tmp_path, monkeypatch):
    """Weights first, config (which holds their checksum) last: killed before the weights land, the old model
    loads whole; killed between the two, loading refuses the mix instead of running half-new weights."""
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    d = old.save_pretrained(tmp_path / "m")
    kill_on_rename(monkeypatch, which=1)
    with pytest.raises(Killed):
        new.save_pretrained(d)
    assert EdgeVLA.from_pretrained(d).fingerprint() == old.fingerprint()
    kill_on_rename(monkeypatch, which=2)
    with pytest.raises(Killed):
        new.save_pretrained(d)
    with pytest.raises(CheckpointError, match="checksum"):
        EdgeVLA.from_pretrained(d)
    monkeypatch.undo()
    new.save_pretrained(d)
    assert EdgeVLA.from_pretrained(d).fingerprint() == new.fingerprint()
    assert not [f for f in d.iterdir() if f.name.startswith(".")]


def test_a_delta_saved_over_survives_a_kill(tmp_path, monkeypatch):
    model = tiny_model(seed=0)
    slices = [s for h in model.heads()[:1] for s in h.slices("qo")]
    first = SteeringDelta.from_model(model, slices, model.fingerprint())
    p = first.save(tmp_path / "steering.safetensors")
    with torch.no_grad():
        for s in slices:
            dict(model.named_parameters())[s.param].add_(1.0)
    second = SteeringDelta.from_model(model, slices, model.fingerprint())
    assert second.hash() != first.hash()
    kill_on_rename(monkeypatch)
    with pytest.raises(Killed):
        second.save(p)
    assert SteeringDelta.load(p).hash() == first.hash()
    monkeypatch.undo()
    second.save(p)
    assert SteeringDelta.load(p).hash() == second.hash()
