"""`edge-steer bench adapt`: the few-shot adaptation benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edge_steer.cli._common import _fail, console


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        _fail(f"expected comma-separated integers, got {text!r}")


def bench_adapt(out: Path = typer.Option(Path("runs/adapt"), help="work directory (resumable)"),
                quick: bool = typer.Option(False, help="one variant, one K, one seed, few episodes (minutes)"),
                variants: Optional[str] = typer.Option(None, help="comma-separated held-out tasks (default: all)"),
                shots: Optional[str] = typer.Option(None, help="K values, e.g. 5,10,20"),
                seeds: Optional[str] = typer.Option(None, help="e.g. 0,1,2"),
                methods: Optional[str] = typer.Option(None, help="subset of zero-shot,steer,lora,full"),
                episodes: Optional[int] = typer.Option(None, min=1, help="evaluation episodes per cell"),
                steps: Optional[int] = typer.Option(None, min=1), lr: Optional[float] = typer.Option(None),
                top_k: Optional[int] = typer.Option(None, min=1),
                perturb_episodes: Optional[int] = typer.Option(None, min=0, help="robustness episodes per perturbation (main and grid arms)"),
                perturb_shots: Optional[int] = typer.Option(None, min=1, help="run the perturbations at this K only (default: every K)"),
                ablations: bool = typer.Option(False, help="k / slices / head-selection sweeps"),
                arms: Optional[str] = typer.Option(None, help="only these ablation arms, e.g. select=random,slices=o; '&' joins settings into one arm (whole=stem.0&select=random)"),
                ablation_shots: Optional[int] = typer.Option(None, min=1, help="the K the ablation sweeps run at (default: the smallest)"),
                ablation_seeds: Optional[str] = typer.Option(None, help="the seeds the sweeps run on, of --seeds (default: the first)"),
                ablation_episodes: Optional[int] = typer.Option(None, min=1, help="evaluation episodes per sweep cell (default: --episodes)"),
                grid_arms: Optional[str] = typer.Option(None, help="method:arm run on every K and seed like the main arms, e.g. steer:whole=stem.0,full:lr=0.0001"),
                model: Optional[Path] = typer.Option(None, help="base checkpoint (default: embedded model)"),
                refit: bool = typer.Option(False, help="fit again the cells to extend to --episodes whose saved model is gone"),
                dry_run: bool = typer.Option(False, help="print the plan left to run (demo sets, fine-tunes, episodes) and its price; run nothing"),
                workers: Optional[int] = typer.Option(None, min=1, help="local: episodes in parallel; ray: the embedded Ray's CPUs; --dry-run: price it on this many workers"),
                executor: str = typer.Option("local", help="local (one unit at a time over --workers processes) or ray (docs/cluster.md)"),
                ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join (default: an embedded local Ray)"),
                report: bool = typer.Option(False, help="write the tables, plots and --docs section from the cells already in --out; run nothing"),
                docs: Optional[Path] = typer.Option(None, help="markdown file to write the results section into")) -> None:
    """Few-shot adaptation: zero-shot vs steer vs LoRA vs full on the held-out sim variants."""
    import sys

    from edge_steer.bench import adapt
    from edge_steer.bench.docs import git_commit, upsert_section

    base = adapt.AdaptConfig.quick() if quick else adapt.AdaptConfig()
    cfg = adapt.with_overrides(
        base, variants=tuple(variants.split(",")) if variants else None, shots=_ints(shots) if shots else None,
        seeds=_ints(seeds) if seeds else None, methods=tuple(methods.split(",")) if methods else None,
        episodes=episodes, steps=steps, lr=lr, top_k=top_k, perturb_episodes=perturb_episodes,
        perturb_shots=perturb_shots,
        ablations=ablations or None, arms=tuple(arms.split(",")) if arms else None, ablation_shots=ablation_shots,
        ablation_seeds=_ints(ablation_seeds) if ablation_seeds else None, ablation_episodes=ablation_episodes,
        grid_arms=tuple(grid_arms.split(",")) if grid_arms else None, model=str(model) if model else None,
        refit=refit or None, workers=workers)
    if bad := set(cfg.methods) - set(adapt.METHODS):
        _fail(f"unknown methods {sorted(bad)}; choose from {adapt.METHODS}")
    try:
        adapt.ablation_arms(cfg)
        adapt.grid_arms(cfg)
    except ValueError as e:
        _fail(str(e))
    try:
        if report:
            cells = adapt.measured(cfg, out)
        else:
            with _unit_progress(not dry_run) as progress:
                cells = _bench_adapt_run(cfg, out, dry_run, executor, ray_address, workers, progress)
    except (adapt.ForeignCells, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if dry_run:
        return
    summary = adapt.summarise(cells, cfg.grid_arms)
    plots = adapt.plot(summary, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = adapt.markdown(summary, cfg, "edge-steer " + " ".join(sys.argv[1:]), git_commit())
    if report:
        text = ("Rendered with `--report` from the cells measured so far, not a finished run: each row pools the "
                "cells it has (its episodes column), while the config line is what the finished run asks for.\n\n" + text)
    (out / "results.md").write_text(text)
    console.print(text)
    console.print(f"plots: {', '.join(str(p) for p in plots)}; raw cells: {out / 'cells.json'}")
    if docs:
        import shutil
        docs.parent.mkdir(parents=True, exist_ok=True)
        for p in plots:
            shutil.copy(p, docs.parent / p.name)
        # named after the run folder (runs/adapt13 -> docs/results/adapt13_cells.json): the file a later run resumes from
        (docs.parent / "results").mkdir(exist_ok=True)
        shutil.copy(out / "cells.json", docs.parent / "results" / f"{out.name}_cells.json")
        heading = "## Few-shot adaptation" + (" (quick)" if quick else "")
        section = heading + "\n\n" + text + "\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots)
        upsert_section(str(docs), section, title="# Results")


def _unit_progress(show: bool):
    """A bar of a plan's units: done of all, with how many run now, how many are left and the cluster's CPUs."""
    from contextlib import nullcontext
    if not show:
        return nullcontext(None)
    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[state]}"), TimeElapsedColumn(), console=console, transient=False)

    class Bar:
        def __enter__(self):
            prog.__enter__()
            self.bar = prog.add_task("units", total=None, state="")
            return self.update

        def update(self, done: int, running: int, left: int, cpus: int) -> None:
            prog.update(self.bar, completed=done, total=done + running + left,
                        state=f"{running} running, {left} left, {cpus} CPUs")

        def __exit__(self, *exc):
            return prog.__exit__(*exc)
    return Bar()


def _bench_adapt_run(cfg, out: Path, dry_run: bool, executor: str, address: Optional[str], workers: Optional[int],
                     progress):
    from edge_steer.bench import adapt, executors
    runner = executors.make(executor, address, workers, progress)
    try:
        if not dry_run:
            return adapt.run(cfg, out, say=console.print, executor=runner)
        # priced as a cluster runs it when a cluster size is given: episodes in Ray's batches
        plan = adapt.plan(cfg, out, executors.RAY_EPISODE_BATCH if workers or executor == "ray" else None)
        for line in adapt.describe(plan) + adapt.dry_run_report(
                plan, runner.cluster_cpus() if executor == "ray" else workers):
            console.print(line)
        return list(plan.cells.values())
    finally:
        if executor == "ray":
            runner.shutdown()
