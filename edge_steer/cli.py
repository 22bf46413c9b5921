"""`edge-steer`: thin commands that parse arguments and call the rooms of the package."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(help="edge-steer: steer a VLA by its attention heads, export it, serve it on a robot.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
tasks_app = typer.Typer(help="The task registry.", no_args_is_help=True)
demos_app = typer.Typer(help="Scripted demonstrations in LeRobot format.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
app.add_typer(demos_app, name="demos")
console = Console()


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code=2)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


@tasks_app.command("list")
def tasks_list(split: Optional[str] = typer.Option(None, help="base | heldout"),
               as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List every task: base tasks for pretraining and held-out variants for few-shot steering."""
    from edge_steer.sim.tasks import TASKS, TaskError, tasks_by_split

    try:
        tasks = tasks_by_split(split) if split else list(TASKS.values())
    except TaskError as e:
        _fail(str(e))
    if as_json:
        print(json.dumps([{"name": t.name, "split": t.split, "factor": t.factor, "base": t.base,
                           "instruction": t.instruction, "env": t.env.__dict__} for t in tasks], indent=1))
        return
    table = Table("split", "factor", "instruction", "environment")
    table.add_column("name", no_wrap=True)
    table.columns.insert(0, table.columns.pop())
    for t in tasks:
        env = f"{t.env.lighting} light, {t.env.table}, {t.env.distractors} distr., jitter {t.env.camera_jitter}"
        table.add_row(t.name, t.split, t.factor or "-", t.instruction, env)
    console.print(table)


@demos_app.command("generate")
def demos_generate(task: str = typer.Option(..., help="task name (see `edge-steer tasks list`)"),
                   episodes: int = typer.Option(10, min=1, help="successful episodes to record"),
                   seed: int = typer.Option(0, help="generation seed (scene layouts derive from it)"),
                   out: Path = typer.Option(..., help="dataset directory (created or appended to)"),
                   image_size: int = typer.Option(128, min=32, max=512),
                   workers: int = typer.Option(0, help="worker processes (0 = one per core, at most 2)"),
                   keep_failed: bool = typer.Option(False, help="also store episodes the expert failed")) -> None:
    """Record scripted-expert demonstrations of a task (LeRobot v3.0 layout, crash-safe)."""
    from edge_steer.sim.demos import generate_demos
    from edge_steer.sim.env import EnvConfig
    from edge_steer.sim.tasks import TaskError, get_task

    try:
        get_task(task)
    except TaskError as e:
        _fail(str(e))
    t0 = time.perf_counter()
    with _progress() as prog:
        bar = prog.add_task(f"demos {task}", total=episodes)

        def tick(ep):
            if ep.success:
                prog.advance(bar)

        summary = generate_demos(task, episodes, seed, out, EnvConfig(image_size=image_size),
                                 workers=workers or None, keep_failed=keep_failed, on_episode=tick)
    dt = time.perf_counter() - t0
    console.print(f"saved {summary['saved']} episodes to {out} ({summary['failed']} expert failures, "
                  f"{dt:.1f} s, {60 * summary['saved'] / dt:.1f} episodes/min)")


@demos_app.command("replay")
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


@app.command("demo")
def demo(out: Path = typer.Option(Path("runs/demo"), help="working directory for the run"),
         task: str = typer.Option("red_cube_in_front_of_blue_plate", help="task to demonstrate"),
         episodes: int = typer.Option(5, min=1, help="few-shot demonstrations to record")) -> None:
    """The main job end to end in simulation: record few-shot demos, then replay one and report."""
    data = out / "demos" / task
    if data.exists():
        import shutil
        shutil.rmtree(data)
    demos_generate(task=task, episodes=episodes, seed=0, out=data, image_size=128, workers=0, keep_failed=False)
    demos_replay(data=data, episode=0)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
