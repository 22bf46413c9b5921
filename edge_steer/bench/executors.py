"""Where a plan's units run: the local pool (one unit at a time, its episodes or fit threads over `workers`
processes, as the benchmark always ran) or a Ray cluster (every unit a Ray task, as many at once as the
cluster has room for).

An executor calls `run_unit(kind, spec)` for each unit once its `after` units are done, `started(unit)` as it
starts it and `done(unit, result)` as it finishes, always in this (the driver's) process: the driver is the
one writer of results. Ray is imported only here and only when a Ray executor is made, never on the robot's
serving path.

Folders travel through Ray's object store, so the nodes share no filesystem: a unit's `inputs` (base
checkpoint, demo set, fitted model) are packed once by the driver, or taken straight from the unit that wrote
them, and unpacked into a temporary folder on the node that runs it; its `output` folder (a demo set, a fitted
model) comes back packed and the driver writes it where the plan put it, so a resumed run finds it on disk.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RAY_EPISODE_BATCH = 5   # clean episodes per Ray task: small enough to spread a cell's episodes over nodes
Started = Callable[[Any], None]
Done = Callable[[Any, dict[str, Any]], None]
# what the CLI's progress bar is told: units done, running, left, and the cluster's CPUs
Progress = Callable[[int, int, int, int], None]


@dataclass
class LocalExecutor:
    """Today's pool: units one after another in plan order, each spreading its episodes over `workers`
    processes (a fit: `workers` threads, in its own process when the plan says `isolate`)."""
    progress: Progress | None = None
    episode_batch: int | None = None        # a cell's episodes as one unit: one pool start per cell

    def run(self, units: list, run_unit: Callable[[str, dict], dict], started: Started, done: Done) -> None:
        for i, unit in enumerate(units):
            if self.progress:
                self.progress(i, 1, len(units) - i - 1, os.cpu_count() or 1)
            started(unit)
            done(unit, run_unit(unit.kind, unit.spec))
        if self.progress:
            self.progress(len(units), 0, 0, os.cpu_count() or 1)


def pack(folder: str | Path) -> bytes:
    """A folder as an uncompressed tar (checkpoints and parquet are compressed already)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(str(folder), arcname=".")
    return buf.getvalue()


def unpack(blob: bytes, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        tar.extractall(folder, filter="data")
    return folder


def _run_shipped(run_unit: Callable, kind: str, spec: dict[str, Any], below: dict[str, str], output: str | None,
                 *blobs: bytes) -> tuple[dict[str, Any], bytes | None]:
    """On a Ray worker: unpack the unit's input folders (spec field -> its path below the shipped folder, the
    blobs in that order; Ray resolves them as top-level arguments), run it with its output in a temporary
    folder, and return its result and that folder packed."""
    with tempfile.TemporaryDirectory(prefix="edge_steer_unit_") as tmp:
        spec = dict(spec)
        for i, ((name, sub), blob) in enumerate(zip(below.items(), blobs)):
            spec[name] = str(unpack(blob, Path(tmp) / f"in{i}") / sub)
        if output:
            spec[output] = str(Path(tmp) / "out")
        res = run_unit(kind, spec)
        return res, (pack(spec[output]) if output else None)


@dataclass
class RayExecutor:
    """Every unit a Ray task on the cluster at `address` (None: an embedded local Ray of `num_cpus` CPUs, so it
    runs on one machine with nothing else started). Fits and episodes declare their CPUs and memory; a fit
    gets a fresh worker process (`max_calls=1`), so its peak RSS is its own. A task whose worker dies is retried
    (`retries`), on another node where there is one."""
    address: str | None = None
    num_cpus: int | None = None
    progress: Progress | None = None
    episode_batch: int | None = RAY_EPISODE_BATCH
    fit_cpus: float = 1.0
    fit_memory: int = 2 << 30
    episode_cpus: float = 1.0
    episode_memory: int = 1 << 30
    retries: int = 3
    _owns_ray: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        import ray
        if not ray.is_initialized():
            ray.init(address=self.address, num_cpus=None if self.address else self.num_cpus,
                     include_dashboard=False, log_to_driver=False, logging_level="WARNING")
            self._owns_ray = True

    def cluster_cpus(self) -> int:
        import ray
        return int(ray.cluster_resources().get("CPU", 0))

    def shutdown(self) -> None:
        if self._owns_ray:
            import ray
            ray.shutdown()
            self._owns_ray = False

    def _options(self, kind: str) -> dict[str, Any]:
        if kind == "fit":
            return {"num_cpus": self.fit_cpus, "memory": self.fit_memory, "name": "edge_steer.fit"}
        return {"num_cpus": self.episode_cpus, "memory": self.episode_memory, "name": f"edge_steer.{kind}"}

    def run(self, units: list, run_unit: Callable[[str, dict], dict], started: Started, done: Done) -> None:
        import ray

        task = ray.remote(num_returns=2, max_retries=self.retries)(_run_shipped)
        fit_task = ray.remote(num_returns=2, max_retries=self.retries, max_calls=1)(_run_shipped)
        by_id = {u.id: u for u in units}
        waiting = [u.id for u in units]     # in plan order: what is ready first is submitted first
        finished: set[str] = set()
        running: dict[Any, Any] = {}        # result ref -> unit
        outputs: dict[Path, Any] = {}       # folder -> ref of its blob (written by a unit, or packed here)
        cpus = self.cluster_cpus()

        def blob_of(path: Path) -> tuple[str, Any]:
            """The shipped folder holding `path` and where `path` is below it."""
            for folder, ref in outputs.items():
                if path == folder or folder in path.parents:
                    return str(path.relative_to(folder)), ref
            outputs[path] = ray.put(pack(path))
            return ".", outputs[path]

        def submit(unit) -> None:
            spec = dict(unit.spec)
            if unit.kind == "fit":      # the worker is the fit's own process, its threads the CPUs it declared
                spec.update(isolate=False, threads=max(1, int(self.fit_cpus)))
            else:
                spec["workers"] = 1
            inputs = {name: blob_of(Path(spec[name])) for name in unit.inputs}
            started(unit)
            res, blob = (fit_task if unit.kind == "fit" else task).options(**self._options(unit.kind)).remote(
                run_unit, unit.kind, spec, {n: sub for n, (sub, _) in inputs.items()}, unit.output,
                *(ref for _, ref in inputs.values()))
            running[res] = (unit, blob)
            if unit.output:
                outputs[Path(unit.spec[unit.output])] = blob

        def tell() -> None:
            if self.progress:
                self.progress(len(finished), len(running), len(units) - len(finished) - len(running), cpus)

        while waiting or running:
            # as many in flight as the cluster has CPUs: what runs is what the bar says runs, the rest waits here
            room = max(1, cpus) - len(running)
            ready_now = [u for u in waiting if all(a in finished for a in by_id[u].after)][:max(0, room)]
            submitted = set(ready_now)
            waiting = [u for u in waiting if u not in submitted]
            for uid in ready_now:
                submit(by_id[uid])
            tell()
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                unit, blob = running.pop(ref)
                res = ray.get(ref)
                if unit.output:         # on the driver's disk before the result counts: a resumed run finds it
                    out = Path(unit.spec[unit.output])
                    tmp = out.with_name(f".{out.name}.incoming")
                    _replace_dir(unpack(ray.get(blob), tmp), out)
                done(unit, res)
                finished.add(unit.id)
            cpus = self.cluster_cpus() or cpus
        tell()


def _replace_dir(src: Path, dst: Path) -> None:
    import shutil
    shutil.rmtree(dst, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def make(executor: str, address: str | None = None, workers: int | None = None, progress: Progress | None = None):
    """The executor the CLI names: "local" or "ray" (at `address`, or embedded with `workers` CPUs)."""
    if executor == "local":
        if address:
            raise ValueError("--ray-address needs --executor ray")
        return LocalExecutor(progress=progress)
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ValueError("--executor ray needs Ray: pip install 'edge-steer[ray]'") from None
        return RayExecutor(address=address, num_cpus=workers, progress=progress)
    raise ValueError(f"unknown executor {executor!r}; choose local or ray")


def ray_evaluate(executor: RayExecutor, model: str | Path, tasks: list, episodes: int, seed: int,
                 execute: int = 5, ensemble: float | None = None, gif_first: bool = False,
                 on_result: Callable | None = None, instruction: str | None = None) -> list:
    """`edge_steer.sim.rollout.evaluate` on the cluster: each task's episodes in batches of
    `executor.episode_batch`, one Ray task each, the checkpoint shipped once. The same scenes and the same
    per-episode results as the local pool (episode i's scene comes from (seed, i, task) alone), in its order."""
    import ray

    task = ray.remote(max_retries=executor.retries)(_evaluate_batch)
    model_ref = ray.put(pack(model))
    step = executor.episode_batch or episodes
    refs = [task.options(num_cpus=executor.episode_cpus, memory=executor.episode_memory).remote(
                model_ref, t, min(step, episodes - first), seed, first, execute, ensemble, gif_first and first == 0,
                instruction)
            for t in tasks for first in range(0, episodes, step)]
    results = []
    for ref in refs:      # in submission order: the local pool's order
        batch = ray.get(ref)
        results += batch
        for r in batch:
            if on_result:
                on_result(r)
    return results


def _evaluate_batch(model_blob: bytes, task, n: int, seed: int, first: int, execute: int, ensemble: float | None,
                    gif_first: bool, instruction: str | None) -> list:
    from functools import partial

    from edge_steer.models import load_model
    from edge_steer.sim.rollout import evaluate

    with tempfile.TemporaryDirectory(prefix="edge_steer_eval_") as tmp:
        model = unpack(model_blob, tmp)
        return evaluate(partial(load_model, model), [task], n, seed, workers=1, first=first,
                        execute=execute, ensemble=ensemble, gif_first=gif_first, instruction=instruction)
