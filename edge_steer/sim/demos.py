"""Few-shot demonstrations: run the scripted expert, record episodes into a dataset, replay them.

Episodes are generated in worker processes (MuJoCo rendering and physics are CPU-bound) and written
by this process alone, so the dataset writer stays single-writer and crash-safe.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from edge_steer.contract import ACTION_NAMES
from edge_steer.sim.env import EnvConfig, SimEnv
from edge_steer.sim.expert import Perturbation, ScriptedExpert, run_expert_episode
from edge_steer.sim.panda import ControlException
from edge_steer.sim.pool import episode_seed, process_pool  # noqa: F401  (tools and tests import them from here)
from edge_steer.sim.tasks import get_task


@dataclass(frozen=True)
class Takeover:
    """Demos from the states a policy gets itself into (DAgger's point, in a form the dataset's
    chunk labels can hold): the policy drives each episode for a random number of steps in
    [first, last], then the expert takes over from wherever the policy left the arm, the gripper
    and the object (`ScriptedExpert.resume`). Only the expert's part is recorded, so every recorded
    chunk is one consistent expert plan, starting from a state the policy visited. An episode the
    policy finishes before the handover records nothing.

    `load_policy`: a picklable zero-argument callable that each worker calls once."""
    load_policy: Callable
    first: int = 5
    last: int = 100
    execute: int = 5

    def __post_init__(self):
        if not 0 <= self.first <= self.last:
            raise ValueError(f"takeover steps must satisfy 0 <= first <= last, got {self.first}..{self.last}")
        if self.execute < 1:
            raise ValueError(f"execute must be >= 1, got {self.execute}")

    def step(self, seed: int) -> int:
        """The handover step of the episode with this scene seed (reproducible)."""
        return int(np.random.default_rng([seed, 7]).integers(self.first, self.last + 1))


@dataclass
class RecordedEpisode:
    task: str
    instruction: str
    seed: int
    success: bool
    frames: list[dict[str, np.ndarray]]
    extra: dict = field(default_factory=dict)   # what the episode's metadata adds (a takeover's step)
    skipped: bool = False                       # the policy finished the task before the handover
    policy_fault: bool = False                  # the policy tripped a robot reflex before the handover


def record_episode(task_name: str, seed: int, config: EnvConfig = EnvConfig(),
                   perturb: Perturbation = Perturbation(), takeover: Takeover | None = None) -> RecordedEpisode:
    """One expert demo; with `takeover`, the worker's policy (`rollout.init_policy_worker`) drives
    the first part and the expert's rest is what is recorded."""
    from edge_steer.sim.rollout import drive_policy, worker_policy

    task = get_task(task_name)
    instruction = task.instruction_for(seed)   # a v2 task words each episode with one of its templates
    frames: list[dict[str, np.ndarray]] = []

    def record(obs, action):
        frames.append({**obs, "action": action})

    if takeover is not None:   # the expert's part gets a whole episode's budget after the handover
        config = replace(config, max_steps=config.max_steps + takeover.last)
    with SimEnv(task, seed, config) as env:
        expert, extra = None, {}
        if takeover is not None:
            try:
                if drive_policy(env, worker_policy(), takeover.step(seed), takeover.execute):
                    return RecordedEpisode(task_name, instruction, seed, False, [], skipped=True)
            except ControlException:   # the policy tripped a reflex: no state to take over from
                return RecordedEpisode(task_name, instruction, seed, False, [], policy_fault=True)
            expert = ScriptedExpert.resume(env)
            with env.world.lock:
                pick = env.world.object_pos(0)
            extra = {"takeover_step": env.steps, "pick_x": float(pick[0]), "pick_y": float(pick[1])}
        ok = run_expert_episode(env, record, perturb, expert=expert)
    if (template := task.template_index(seed)) is not None:
        extra["template"] = template
    return RecordedEpisode(task_name, instruction, seed, ok, frames, extra)


def _record(args) -> RecordedEpisode:
    return record_episode(*args)


def generate_demos(task_name: str, episodes: int, seed: int, out: str | Path, config: EnvConfig = EnvConfig(),
                   workers: int | None = None, keep_failed: bool = False, perturb: Perturbation = Perturbation(),
                   on_episode: Callable[[RecordedEpisode], None] | None = None,
                   takeover: Takeover | None = None, resume: bool = False) -> dict:
    """Record `episodes` expert demos of a task into the dataset at `out` (appending).

    `resume`: count the episodes of this task and seed already in `out` (those whose scene seed this run would
    draw) towards `episodes` and skip their scenes, so a run killed part-way and started again with the same
    arguments records what the whole run would have; runs with other seeds in the same dataset do not count."""
    from edge_steer.data import DatasetWriter, default_spec

    get_task(task_name)  # fail fast on an unknown name
    if episodes < 1:
        raise ValueError("episodes must be >= 1")
    workers = workers or min(2, os.cpu_count() or 1)
    spec = default_spec(image_size=config.image_size, fps=config.fps)
    # a policy that often finishes before the handover leaves many tries with nothing to record
    max_attempts = (2 if takeover is None else 5) * episodes + 10
    mine = {episode_seed(seed, i, task_name) for i in range(max_attempts)}
    done = recorded_seeds(out, task_name) & mine if resume else set()
    saved, failed, skipped, faults, attempts = 0, 0, 0, 0, 0
    if len(done) >= episodes:
        return {"task": task_name, "saved": 0, "failed": 0, "skipped": 0, "policy_faults": 0, "attempts": 0,
                "out": str(out), "already": len(done)}
    with DatasetWriter(out, spec) as writer:
        for ep in _episodes(task_name, seed, config, workers, episodes - len(done), max_attempts, perturb, takeover,
                            done):
            attempts += 1
            if ep.skipped:
                skipped += 1
            elif ep.success or (keep_failed and ep.frames):
                writer.begin_episode()
                for f in ep.frames:
                    writer.add_frame(f, task=ep.instruction)
                writer.end_episode(success=ep.success, extra={"task_name": ep.task, "seed": ep.seed,
                                                              "env_config": str(asdict(config)),
                                                              **asdict(perturb), **ep.extra})
                saved += 1
            if ep.policy_fault:
                faults += 1
            elif not ep.success and not ep.skipped:
                failed += 1
            if on_episode:
                on_episode(ep)
            if saved + len(done) >= episodes:
                break
    if saved + len(done) < episodes:
        why = []
        if skipped:
            why.append(f"{skipped} finished by the policy before the handover")
        if faults:
            why.append(f"{faults} where the policy tripped a reflex first")
        raise RuntimeError(f"the expert failed too often on {task_name}: {saved + len(done)}/{episodes} saved after "
                           f"{attempts} tries"
                           + (f" ({', '.join(why)})" if why else ""))
    return {"task": task_name, "saved": saved, "failed": failed, "skipped": skipped, "policy_faults": faults,
            "attempts": attempts, "out": str(out), "already": len(done)}


def recorded_seeds(out: str | Path, task_name: str) -> set[int]:
    """The scene seeds of the task's episodes already in the dataset at `out` (none if it does not exist);
    reads the episode table only, not the frames."""
    from edge_steer.data import layout
    from edge_steer.data.schema import INFO_PATH

    root = Path(out)
    if not (root / INFO_PATH).is_file():
        return set()
    table = layout.read_episodes(root, layout.read_info(root))
    if "task_name" not in table.column_names or "seed" not in table.column_names:
        return set()
    return {int(s) for t, s in zip(table["task_name"].to_pylist(), table["seed"].to_pylist()) if t == task_name}


def _episodes(task_name, seed, config, workers, wanted, max_attempts, perturb, takeover,
              done: set[int] | frozenset[int] = frozenset()) -> Iterator[RecordedEpisode]:
    from edge_steer.sim.rollout import init_policy_worker

    seeds = (episode_seed(seed, i, task_name) for i in range(max_attempts))
    args = ((task_name, s, config, perturb, takeover) for s in seeds if s not in done)
    policy = (takeover.load_policy,) if takeover is not None else None
    if workers <= 1:
        if policy:
            init_policy_worker(*policy)
        yield from map(_record, args)
        return
    # keep at most `workers` episodes in flight so a short run does not over-generate
    with process_pool(workers, init_policy_worker if policy else None, policy or ()) as pool:
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
    if extra.get("takeover_step") is not None:
        raise ValueError(f"episode {episode_index} starts where a policy handed over at step "
                         f"{extra['takeover_step']}; that first part was not recorded, so it cannot be replayed")
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
        pick = scene.spec.objects[0].xy
        if ep.extra.get("pick_x") is not None:   # a takeover: the policy may have moved the object
            pick = (ep.extra["pick_x"], ep.extra["pick_y"])
        out[ep.index] = np.array([*pick, *scene.goal_xy, close], dtype=np.float32)
    return out


def with_scene_targets(batches: Iterator[dict], targets: dict[int, np.ndarray]) -> Iterator[dict]:
    """Add `scene_xy` (B, 4) and `scene_xy_valid` (B, 4) to each batch: the pick position counts only
    before the gripper closes (afterwards the object is in the hand), the goal always."""
    for batch in batches:
        rows = np.stack([targets[int(e)] for e in batch["episode_index"]])
        valid = np.ones((len(rows), 4), dtype=bool)
        valid[:, :2] = (batch["frame_index"] < rows[:, 4])[:, None]
        yield {**batch, "scene_xy": rows[:, :4], "scene_xy_valid": valid}


def training_batches(dataset, batch_size: int, chunk: int, seed: int,
                     scene_aux: bool) -> Callable[[int], Iterator[dict]]:
    """`make_batches` for `models.train.fit` over sim demos: the endless chunk stream, with the scene
    loss's targets when the model has that loss (ValueError if an episode was not recorded in sim)."""
    from edge_steer.models.train import batches

    targets = scene_targets(dataset) if scene_aux else None

    def make(start: int) -> Iterator[dict]:
        stream = batches(dataset, batch_size, chunk, seed, start)
        return with_scene_targets(stream, targets) if targets is not None else stream
    return make
