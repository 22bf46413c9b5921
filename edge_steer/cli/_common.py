"""What every command shares: the typer app, the console, the one-line refusal and the usual loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(help="edge-steer: steer a VLA by its attention heads, export it, serve it on a robot.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(soft_wrap=True)  # long paths and messages stay on one line in logs


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code=2)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def _load(model: Optional[Path]):
    from edge_steer.models import CheckpointError, load_model
    try:
        return load_model(model)
    except CheckpointError as e:
        _fail(str(e))


def _demos(path: Path, model=None):
    """The dataset at `path`, refused (one line, exit 2) where it cannot be read or, given the model,
    does not fit it (models.interface.check_dataset): every command that takes demos comes here first."""
    from edge_steer.data import Dataset, DatasetError
    try:
        ds = Dataset(path)
    except (DatasetError, FileNotFoundError) as e:
        _fail(f"cannot read demos at {path}: {e}")
    if model is not None:
        _fits(model, ds)
    return ds


def _fits(model, ds) -> None:
    from edge_steer.data import DatasetError
    from edge_steer.models.interface import check_dataset
    try:
        check_dataset(model, ds)
    except DatasetError as e:
        _fail(f"demos do not fit the model: {e}")
