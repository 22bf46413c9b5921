"""`edge-steer tasks list`: the task registry."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from edge_steer.cli._common import _fail, console


def tasks_list(split: Optional[str] = typer.Option(None, help="base | heldout"),
               suite: str = typer.Option("v1", help="v1 (the v1 checkpoint's tasks) | v2 (the instruction decides)"),
               as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List every task: base tasks for pretraining and held-out variants for few-shot steering."""
    from edge_steer.sim.tasks import TaskError, suite_tasks

    try:
        tasks = suite_tasks(suite, split)
    except TaskError as e:
        _fail(str(e))
    if as_json:
        print(json.dumps([{"name": t.name, "suite": t.suite, "split": t.split, "factor": t.factor, "base": t.base,
                           "instruction": t.instruction, "instructions": list(t.instructions),
                           "env": t.env.__dict__} for t in tasks], indent=1))
        return
    header = ("name", "split", "factor", "instruction", "environment")
    rows = [(t.name, t.split, t.factor or "-", t.instruction,
             f"{t.env.lighting} light, {t.env.table}, {t.env.distractors} distr., jitter {t.env.camera_jitter}")
            for t in tasks]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    if console.is_terminal and console.width >= sum(widths) + 3 * len(widths) + 1:  # the table fits unclipped
        table = Table(*header)
        for r in rows:
            table.add_row(*r)
        console.print(table)
        return
    for r in [header, *rows]:   # piped or narrow: whole values in aligned columns, wrapped by the terminal
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())

