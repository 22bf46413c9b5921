"""Few-shot demonstrations: run the scripted expert, record episodes into a dataset, replay them.

Episodes are generated in worker processes (MuJoCo rendering and physics are CPU-bound) and written
by this process alone, so the dataset writer stays single-writer and crash-safe.
"""

from __future__ import annotations

import multiprocessing
import os
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_steer.sim.env import ACTION_NAMES, EnvConfig, SimEnv
from edge_steer.sim.expert import Perturbation, run_expert_episode
from edge_steer.sim.tasks import get_task


def process_pool(workers: int, initializer=None, initargs=()) -> ProcessPoolExecutor:
    """Worker processes for sim episodes. They are spawned, never forked: a child forked from a
    process that already holds an EGL context hangs when it makes its own renderer."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=initializer, initargs=initargs)


def episode_seed(seed: int, attempt: int, task_name: str) -> int:
    """Distinct, reproducible scene seed for each (run seed, attempt, task): tasks generated with the
    same run seed must not share object layouts."""
    return int(np.random.SeedSequence([seed, attempt, zlib.crc32(task_name.encode())]).generate_state(1)[0])


@dataclass
class RecordedEpisode:
    task: str
    instruction: str
    seed: int
    success: bool
    frames: list[dict[str, np.ndarray]]


def record_episode(task_name: str, seed: int, config: EnvConfig = EnvConfig(),
                   perturb: Perturbation = Perturbation()) -> RecordedEpisode:
    task = get_task(task_name)
    frames: list[dict[str, np.ndarray]] = []

    def record(obs, action):
        frames.append({**obs, "action": action})

    with SimEnv(task, seed, config) as env:
        ok = run_expert_episode(env, record, perturb)
    return RecordedEpisode(task_name, task.instruction, seed, ok, frames)


def _record(args) -> RecordedEpisode:
    return record_episode(*args)


def generate_demos(task_name: str, episodes: int, seed: int, out: str | Path, config: EnvConfig = EnvConfig(),
                   workers: int | None = None, keep_failed: bool = False, perturb: Perturbation = Perturbation(),
                   on_episode: Callable[[RecordedEpisode], None] | None = None) -> dict:
    """Record `episodes` expert demos of a task into the dataset at `out` (appending)."""
    from edge_steer.data import DatasetWriter, default_spec

    get_task(task_name)  # fail fast on an unknown name
    if episodes < 1:
        raise ValueError("episodes must be >= 1")
    workers = workers or min(2, os.cpu_count() or 1)
    spec = default_spec(image_size=config.image_size, fps=config.fps)
    saved, failed, attempts = 0, 0, 0
    max_attempts = 2 * episodes + 10
    with DatasetWriter(out, spec) as writer:
        for ep in _episodes(task_name, seed, config, workers, episodes, max_attempts, perturb):
            attempts += 1
            if ep.success or keep_failed:
                writer.begin_episode()
                for f in ep.frames:
                    writer.add_frame(f, task=ep.instruction)
                writer.end_episode(success=ep.success, extra={"task_name": ep.task, "seed": ep.seed,
                                                              "env_config": str(asdict(config)),
                                                              **asdict(perturb)})
                saved += 1
            if not ep.success:
                failed += 1
            if on_episode:
                on_episode(ep)
            if saved >= episodes:
                break
    if saved < episodes:
        raise RuntimeError(f"the expert failed too often on {task_name}: {saved}/{episodes} saved after {attempts} tries")
    return {"task": task_name, "saved": saved, "failed": failed, "attempts": attempts, "out": str(out)}


def _episodes(task_name, seed, config, workers, wanted, max_attempts, perturb) -> Iterator[RecordedEpisode]:
    args = ((task_name, episode_seed(seed, i, task_name), config, perturb)
            for i in range(max_attempts))
    if workers <= 1:
        yield from map(_record, args)
        return
    # keep at most `workers` episodes in flight so a short run does not over-generate
    with process_pool(workers) as pool:
        pending = [pool.submit(_record, next(args)) for _ in range(min(workers, wanted))]
        while pending:
            ep = pending.pop(0).result()
            yield ep
            nxt = next(args, None)
            if nxt is not None:
                pending.append(pool.submit(_record, nxt))


def replay_episode(dataset_root: str | Path, episode_index: int, config: EnvConfig | None = None) -> bool:
    """Re-run an episode's recorded actions open loop in a fresh sim of the same scene."""
    from edge_steer.data import Dataset

    ds = Dataset(dataset_root)
    meta = ds.episodes[episode_index]
    extra = getattr(meta, "extra", {}) or {}
    task_name, seed = extra.get("task_name"), extra.get("seed")
    if task_name is None or seed is None:
        raise ValueError(f"episode {episode_index} carries no task_name/seed; it was not recorded in sim")
    actions = ds.episode(episode_index)["action"]
    if actions.shape[1] != len(ACTION_NAMES):
        raise ValueError(f"episode actions have {actions.shape[1]} dims, expected {len(ACTION_NAMES)}")
    cfg = config or EnvConfig(image_size=ds.spec.features["observation.images.front"].shape[0], fps=ds.spec.fps)
    with SimEnv(get_task(task_name), int(seed), cfg) as env:
        for a in actions:
            env.step(a)
        return env.success()


def scene_targets(dataset) -> dict[int, np.ndarray]:
    """episode_index -> [pick x, pick y, goal x, goal y, frame the gripper first closes] for every
    episode recorded in sim: the layout is re-sampled from the task and scene seed the episode's
    metadata carries, so nothing beyond the demos is needed. (For the model's auxiliary scene loss.)"""
    frames = dataset.sample(np.arange(len(dataset)), chunk=1, keys=[])
    closes = frames["action"][:, 0, 6] > 0.5
    out = {}
    for ep in dataset.episodes:
        task_name, seed = ep.extra.get("task_name"), ep.extra.get("seed")
        if task_name is None or seed is None:
            raise ValueError(f"episode {ep.index} carries no task_name/seed; it was not recorded in sim")
        scene = get_task(task_name).sample_scene(np.random.default_rng(int(seed)))
        mine = frames["episode_index"] == ep.index
        shut = frames["frame_index"][mine & closes]
        close = int(shut.min()) if len(shut) else ep.length
        out[ep.index] = np.array([*scene.spec.objects[0].xy, *scene.goal_xy, close], dtype=np.float32)
    return out


def with_scene_targets(batches: Iterator[dict], targets: dict[int, np.ndarray]) -> Iterator[dict]:
    """Add `scene_xy` (B, 4) and `scene_xy_valid` (B, 4) to each batch: the pick position counts only
    before the gripper closes (afterwards the object is in the hand), the goal always."""
    for batch in batches:
        rows = np.stack([targets[int(e)] for e in batch["episode_index"]])
        valid = np.ones((len(rows), 4), dtype=bool)
        valid[:, :2] = (batch["frame_index"] < rows[:, 4])[:, None]
        yield {**batch, "scene_xy": rows[:, :4], "scene_xy_valid": valid}
