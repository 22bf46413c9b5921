"""Closed-loop episodes of a policy in the sim, and success statistics.

The policy is anything with `predict(observation, instruction) -> (chunk, 7)` actions; the sim does
not know what is behind it (torch, onnxruntime, TensorRT).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edge_steer.contract import ensemble_actions
from edge_steer.sim.env import EnvConfig, SimEnv
from edge_steer.sim.panda import ControlException
from edge_steer.sim.tasks import Task, instructed_task


class ChunkPolicy(Protocol):
    def predict(self, observation: dict, instruction: str) -> np.ndarray: ...


@dataclass
class EpisodeResult:
    task: str
    seed: int
    success: bool
    steps: int
    frames: list[np.ndarray] = field(default_factory=list, repr=False)
    error: str | None = None      # why the episode ended early (a robot reflex), if it did
    # with another instruction than the task's own (`instruction=`): `success` is the scene's own task
    # done at any step, this the instructed task's (None where it names no task doable in the scene)
    instructed_success: bool | None = None


def run_policy_episode(policy: ChunkPolicy, task: Task, seed: int, config: EnvConfig = EnvConfig(),
                       execute: int = 5, max_steps: int | None = None, keep_frames: bool = False,
                       ensemble: float | None = None, instruction: str | None = None) -> EpisodeResult:
    """Run until the success predicate holds or max_steps; re-plan every `execute` actions.
    `ensemble` (a decay): each step's action is ACT's temporal ensemble of every chunk that covers it.
    A robot reflex (the arm stopping itself, e.g. on a joint-velocity violation) fails the episode.

    `instruction` replaces the task's own in `task`'s scene. Where it names a task doable there
    (`instructed_task`: its object and target each once in the scene), the episode runs until that task is done
    and `success` says whether the scene's own task was done at any step; otherwise it ends as usual."""
    frames: list[np.ndarray] = []
    with SimEnv(task, seed, config) as env:
        told = instructed_task(env.scene, instruction) if instruction is not None else None
        where = told.find_in(env.scene.spec) if told is not None else None
        own = [False]   # the scene's own task done at some step

        def done() -> bool:
            own[0] = own[0] or env.success()
            return own[0] if where is None else told.success(env.world, *where)

        try:
            ok = drive_policy(env, policy, max_steps or config.max_steps, execute, ensemble,
                              frames if keep_frames else None, instruction, done)
        except ControlException as e:
            ok, error = False, str(e)
        else:
            error = None
        return EpisodeResult(task.name, seed, own[0], env.steps, frames, error=error,
                             instructed_success=None if where is None else ok)


def drive_policy(env: SimEnv, policy: ChunkPolicy, until: int, execute: int = 5, ensemble: float | None = None,
                 frames: list[np.ndarray] | None = None, instruction: str | None = None,
                 done: Callable[[], bool] | None = None) -> bool:
    """Let the policy drive `env` until the task succeeds (True) or env.steps reaches `until` (False).
    `instruction` (default: the task's own) is what the policy is told; `done` (default: env.success)
    is the goal checked after each step."""
    instruction = env.task.instruction if instruction is None else instruction
    done = env.success if done is None else done
    chunks: list[tuple[int, np.ndarray]] = []     # (step it was predicted at, chunk), oldest first
    while env.steps < until:
        obs = env.observe()
        if frames is not None:
            frames.append(np.concatenate([obs["observation.images.front"], obs["observation.images.wrist"]], 1))
        chunk = policy.predict(obs, instruction)
        if ensemble is None:
            plan = chunk[:execute]
        else:
            now = env.steps
            chunks = [(t, c) for t, c in chunks if now - t < len(c)] + [(now, chunk)]
            plan = [ensemble_actions([c[now + k - t] for t, c in chunks if now + k - t < len(c)], ensemble)
                    for k in range(min(execute, len(chunk)))]
        for action in plan:
            env.step(action)
            if done():
                return True
            if env.steps >= until:
                break
    return False


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval for a success rate (sound at 0 % and 100 %, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def success_summary(results: list[EpisodeResult], tasks: list[Task], instructed: bool = False) -> list[dict]:
    """One row per task: its own task's successes over its episodes with a 95 % Wilson interval and, where
    an instruction replaced each task's own (`instructed`), the instructed task's successes counted over
    the scenes where it can be done."""
    rows = []
    for t in tasks:
        rs = [r for r in results if r.task == t.name]
        k = sum(r.success for r in rs)
        row = {"task": t.name, "split": t.split, "factor": t.factor, "successes": k, "episodes": len(rs),
               "ci95": list(wilson_interval(k, len(rs)))}
        if instructed:
            doable = [r.instructed_success for r in rs if r.instructed_success is not None]
            row.update(instructed_successes=sum(doable), instructed_episodes=len(doable),
                       instructed_ci95=list(wilson_interval(sum(doable), len(doable))))
        rows.append(row)
    return rows


def episode_log(results: list[EpisodeResult], summary: list[dict], execute: int, ensemble: float | None,
                instruction: str | None = None) -> dict:
    """The evaluation's JSON log: its settings, the per-task summary and every episode."""
    told = {} if instruction is None else {"instruction": instruction}
    log = [{"task": r.task, "seed": r.seed, "success": r.success, "steps": r.steps,
            **({} if instruction is None else {"instructed_success": r.instructed_success})} for r in results]
    return {"execute": execute, "ensemble": ensemble, **told, "summary": summary, "episodes": log}


def save_gif(frames: list[np.ndarray], path: str, fps: int = 10) -> None:
    from PIL import Image
    imgs = [Image.fromarray(f) for f in frames]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)


EVAL_SEED_OFFSET = 1_000_003  # evaluation scenes never coincide with demo scenes of the same run seed
_worker_policy: ChunkPolicy | None = None


def init_policy_worker(load_policy) -> None:
    """A worker process's initializer: load its one policy (`worker_policy()`)."""
    global _worker_policy
    import torch
    torch.set_num_threads(1)  # one process per core beats two threads per process here
    _worker_policy = load_policy()


def worker_policy() -> ChunkPolicy:
    if _worker_policy is None:
        raise RuntimeError("this process has no policy: start it with init_policy_worker")
    return _worker_policy


def _run_one(args) -> EpisodeResult:
    task, seed, config, execute, keep, ensemble, instruction = args
    return run_policy_episode(worker_policy(), task, seed, config, execute, keep_frames=keep, ensemble=ensemble,
                              instruction=instruction)


def evaluate(load_policy, tasks: list[Task], episodes: int, seed: int = 0, config: EnvConfig = EnvConfig(),
             execute: int = 5, workers: int = 2, on_result=None, gif_first: bool = False,
             ensemble: float | None = None, first: int = 0, instruction: str | None = None) -> list[EpisodeResult]:
    """Closed-loop evaluation of `episodes` per task in `workers` spawned processes.

    `load_policy` is a picklable zero-argument callable that each worker calls once. `first` skips the
    first episodes of the seed's sequence, so a later call can extend an evaluation with new scenes.
    `instruction` replaces each task's own (see run_policy_episode)."""
    from edge_steer.sim.pool import episode_seed, process_pool

    jobs = [(t, episode_seed(seed + EVAL_SEED_OFFSET, i, t.name), config, execute, gif_first and i == first, ensemble,
             instruction) for t in tasks for i in range(first, first + episodes)]
    results = []
    if workers <= 1:
        init_policy_worker(load_policy)
        it = map(_run_one, jobs)
        for r in it:
            results.append(r)
            if on_result:
                on_result(r)
        return results
    with process_pool(workers, initializer=init_policy_worker, initargs=(load_policy,)) as pool:
        for r in pool.map(_run_one, jobs):
            results.append(r)
            if on_result:
                on_result(r)
    return results
