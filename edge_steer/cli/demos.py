"""`edge-steer demos generate | replay`: scripted demonstrations in LeRobot format."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from edge_steer.cli._common import _fail, _progress, console


def demos_generate(task: str = typer.Option(..., help="task name(s), comma-separated, or base / heldout / v2-base / v2-heldout"),
                   episodes: int = typer.Option(10, min=1, help="successful episodes to record per task"),
                   seed: int = typer.Option(0, help="generation seed (scene layouts derive from it)"),
                   out: Path = typer.Option(..., help="dataset directory (created or appended to)"),
                   image_size: int = typer.Option(96, min=32, max=512, help="camera resolution (the model input is 96)"),
                   workers: int = typer.Option(0, help="worker processes (0 = one per core, at most 2)"),
                   keep_failed: bool = typer.Option(False, help="also store episodes the expert failed"),
                   action_noise: float = typer.Option(0.0, min=0.0, max=0.02,
                                                      help="m/step of noise on executed (not recorded) actions"),
                   push: float = typer.Option(0.0, min=0.0, max=0.2, help="m: one sideways shove of the arm before the grasp"),
                   approach_push: float = typer.Option(0.0, min=0.0, max=0.05,
                                                       help="m: at most this shove once above the object"),
                   approach_share: float = typer.Option(0.75, min=0.0, max=1.0,
                                                        help="share of episodes with the approach shove"),
                   descent_push: float = typer.Option(0.0, min=0.0, max=0.05,
                                                      help="m: at most this shove 5 cm above the grasp (every episode)"),
                   miss: float = typer.Option(0.0, min=0.0, max=0.08,
                                              help="m: first grasp aimed this far off, unrecorded; the demo shows the recovery"),
                   miss_share: float = typer.Option(0.5, min=0.0, max=1.0, help="share of episodes with the missed grasp"),
                   start_noise: Optional[float] = typer.Option(None, min=0.0, max=0.5,
                                                               help="rad of joint noise on the start pose (default: the sim's)"),
                   takeover: Optional[Path] = typer.Option(None, help="checkpoint that drives each episode first; "
                                                           "the expert takes over and only its part is recorded"),
                   takeover_steps: str = typer.Option("5:100", help="FIRST:LAST, the range of handover steps"),
                   resume: bool = typer.Option(False, help="count each task's episodes of this SEED already in OUT and "
                                               "skip their scenes: a killed run started again with the same arguments "
                                               "finishes it")
                   ) -> None:
    """Record scripted-expert demonstrations of a task (LeRobot v3.0 layout, crash-safe).

    With --takeover, a policy drives the first part of each episode (a random number of steps), and
    the recorded demo is the expert's recovery from the state the policy reached (docs/model.md)."""
    from functools import partial

    from edge_steer.models import CheckpointError, load_model
    from edge_steer.sim.demos import Takeover
    from edge_steer.sim.env import EnvConfig
    from edge_steer.sim.expert import Perturbation
    from edge_steer.sim.tasks import TaskError, resolve_tasks

    try:
        names = [t.name for t in resolve_tasks(task)]
    except TaskError as e:
        _fail(str(e))
    perturb = Perturbation(action_noise, push, approach_push, approach_share, descent_push, miss, miss_share)
    handover = None
    if takeover is not None:
        try:
            first, last = (int(x) for x in takeover_steps.split(":"))
            load_model(takeover)  # fail here, with the reason, rather than in a worker
            handover = Takeover(partial(load_model, takeover), first, last)
        except (ValueError, CheckpointError) as e:
            _fail(f"--takeover {takeover} --takeover-steps {takeover_steps}: {e}")
    env = EnvConfig(image_size=image_size) if start_noise is None else \
        EnvConfig(image_size=image_size, start_noise=start_noise)
    record_demos(task, names, episodes, seed, out, env, workers=workers or None, keep_failed=keep_failed,
                 perturb=perturb, takeover=handover, resume=resume)


def record_demos(label: str, names: list[str], episodes: int, seed: int, out: Path, env, workers: Optional[int] = None,
                 keep_failed: bool = False, perturb=None, takeover=None, resume: bool = False) -> dict:
    """generate_demos for each task under one progress bar, then one summary line; the summed counts."""
    from edge_steer.sim.demos import generate_demos
    from edge_steer.sim.expert import Perturbation

    t0 = time.perf_counter()
    totals = {"saved": 0, "failed": 0, "skipped": 0, "policy_faults": 0, "already": 0}
    with _progress() as prog:
        bar = prog.add_task(f"demos {label}", total=episodes * len(names))

        def tick(ep):
            if ep.success:
                prog.advance(bar)

        for name in names:
            summary = generate_demos(name, episodes, seed, out, env, workers=workers, keep_failed=keep_failed,
                                     on_episode=tick, perturb=perturb or Perturbation(), takeover=takeover,
                                     resume=resume)
            prog.advance(bar, summary["already"])
            totals = {k: v + summary[k] for k, v in totals.items()}
    dt = time.perf_counter() - t0
    finished = (f", {totals['skipped']} finished by the policy before the handover, {totals['policy_faults']} "
                f"where the policy tripped a reflex first") if takeover else ""
    there = f"{totals['already']} already there, " if resume else ""
    console.print(f"saved {totals['saved']} episodes to {out} ({there}{totals['failed']} expert failures{finished}, "
                  f"{dt:.1f} s, {60 * totals['saved'] / dt:.1f} episodes/min)")
    return totals


def demos_replay(data: Path = typer.Option(..., help="dataset directory"),
                 episode: int = typer.Option(0, help="episode index")) -> None:
    """Replay an episode's recorded actions open loop in a fresh sim and print whether it succeeds."""
    from edge_steer.data import DatasetError
    from edge_steer.sim.demos import replay_episode

    try:
        ok = replay_episode(data, episode)
    except (DatasetError, ValueError, IndexError) as e:
        _fail(str(e))
    console.print(f"episode {episode} replayed: success={ok}")
    if not ok:
        raise typer.Exit(code=1)

