"""`edge-steer pretrain` and `edge-steer eval`: train the reference VLA, measure closed-loop success."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from edge_steer.cli._common import _demos, _fail, _fits, _load, _progress, console


def pretrain(data: Path = typer.Option(..., help="dataset of base-task demos"),
             out: Path = typer.Option(..., help="run directory: checkpoints/, model/, eval.json"),
             steps: int = typer.Option(4000, min=1), batch_size: int = typer.Option(64, min=1),
             lr: float = typer.Option(3e-4), seed: int = typer.Option(0),
             language: str = typer.Option("minilm", help="minilm | embedding"),
             n_kv_heads: int = typer.Option(0, help="key/value heads (0 = as many as query heads; fewer = GQA)"),
             resume: bool = typer.Option(True, help="continue from the latest checkpoint in OUT"),
             state_dropout: float = typer.Option(0.0, min=0.0, max=1.0, help="share of samples trained without the state"),
             keypoints: int = typer.Option(0, min=0, help="spatial-softmax keypoint token per camera with K maps (0 = none)"),
             scene_aux: float = typer.Option(0.0, min=0.0, help="weight of the auxiliary pick/goal position loss (sim demos)"),
             augment_shift: Optional[int] = typer.Option(None, min=0, help="random image shift in pixels (default: the config's)"),
             init: Optional[Path] = typer.Option(None, help="start from this checkpoint's weights (its architecture, or grown by --n-layers / --n-heads)"),
             d_model: Optional[int] = typer.Option(None, min=16, help="trunk width (default: the config's 128)"),
             n_layers: Optional[int] = typer.Option(None, min=1, help="trunk depth (default: the config's 4); with "
                                                    "--init, more layers than it has grow it (new ones start as identity)"),
             n_heads: Optional[int] = typer.Option(None, min=1, help="query heads per layer (default: the config's 8); "
                                                   "with --init, more grow it (new heads start with zero output)"),
             head_dim: Optional[int] = typer.Option(None, min=4, help="dims per head (default: the config's 16)"),
             eval_episodes: int = typer.Option(10, min=0, help="closed-loop episodes per base task at the end"),
             workers: int = typer.Option(2, min=1),
             backbone: str = typer.Option("edge", help="edge (the reference EdgeVLA), a named transformers backbone "
                                          "(minilm, tiny-bert, tiny-llama, tiny-qwen2, tiny-gemma, smolvla) or a local "
                                          "transformers directory (BERT, Llama, Qwen2, Gemma, Mistral): an HFVLA"),
             vision: Optional[str] = typer.Option(None, help="HFVLA vision tower: siglip-small, siglip-base, tiny-siglip, "
                                                  "tiny-vit, tiny-clip or a local SigLIP / ViT / CLIP directory"),
             backbone_layers: Optional[int] = typer.Option(None, min=1, help="HFVLA: keep only the first N backbone layers")
             ) -> None:
    """Pretrain a VLA (the reference EdgeVLA, or an HFVLA on transformers towers) on demonstrations of
    the base tasks, then evaluate it in the sim."""
    from edge_steer.models import EdgeVLA, EdgeVLAConfig

    if backbone != "edge":
        edge_only = {"--init": init, "--d-model": d_model, "--n-layers": n_layers, "--n-heads": n_heads,
                     "--head-dim": head_dim, "--keypoints": keypoints or None, "--scene-aux": scene_aux or None,
                     "--state-dropout": state_dropout or None, "--n-kv-heads": n_kv_heads or None}
        if given := [k for k, v in edge_only.items() if v is not None]:
            _fail(f"{', '.join(given)} shape the reference EdgeVLA only, not --backbone {backbone}")
    elif vision is not None or backbone_layers is not None:
        _fail("--vision and --backbone-layers build an HFVLA: give --backbone NAME|DIR as well")
    ds = _demos(data)
    if backbone != "edge":
        model = _hf_model(backbone, vision, backbone_layers, augment_shift)
        _fits(model, ds)
        model.set_stats(ds.stats)
        _train_and_eval(model, ds, out, steps, batch_size, lr, seed, resume, False, eval_episodes, workers)
        return
    from dataclasses import replace as _replace

    base = EdgeVLAConfig()
    trunk = {k: v for k, v in dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, head_dim=head_dim).items()
             if v is not None}
    start = _load(init) if init is not None else None
    if start is not None and (fixed := [k for k in ("d_model", "head_dim") if k in trunk]):
        _fail(f"--init {init} fixes the trunk's width; --{', --'.join(k.replace('_', '-') for k in fixed)} "
              "can only start a model from scratch (--n-layers / --n-heads grow it)")
    try:
        if start is not None and trunk:
            start = start.grown(trunk.get("n_layers"), trunk.get("n_heads"))
        if start is not None:
            cfg = _replace(start.config, state_dropout=state_dropout, scene_aux=scene_aux)
        else:
            shift = base.augment_shift if augment_shift is None else augment_shift
            heads = trunk.get("n_heads", base.n_heads)
            cfg = EdgeVLAConfig(language=language, n_kv_heads=n_kv_heads or heads, state_dropout=state_dropout,
                                keypoints=keypoints, scene_aux=scene_aux, augment_shift=shift, **trunk)
    except ValueError as e:
        _fail(str(e))
    model = EdgeVLA(cfg)
    _fits(model, ds)
    model.set_stats(ds.stats)  # a resumed run restores these from its checkpoint
    if start is not None:   # new parameters (e.g. the null state token) keep their fresh init
        missing, unexpected = model.load_state_dict(start.state_dict(), strict=False)
        if unexpected:
            _fail(f"--init checkpoint has weights this model lacks: {unexpected[:5]}")
    _train_and_eval(model, ds, out, steps, batch_size, lr, seed, resume, bool(cfg.scene_aux), eval_episodes, workers)


def _hf_model(backbone: str, vision: Optional[str], layers: Optional[int], augment_shift: Optional[int]):
    """An HFVLA from named or local towers; a tower that is missing or unsupported fails in one line."""
    from edge_steer.models.configuration_hfvla import TowerError
    from edge_steer.models.modeling_hfvla import HFVLA
    try:
        return HFVLA.from_names(backbone, vision, layers, **({} if augment_shift is None else
                                                              {"augment_shift": augment_shift}))
    except TowerError as e:
        from rich.markup import escape
        _fail(escape(str(e)))


def _train_and_eval(model, ds, out: Path, steps: int, batch_size: int, lr: float, seed: int, resume: bool,
                    scene_aux: bool, eval_episodes: int, workers: int) -> None:
    from functools import partial

    from edge_steer.models import load_model
    from edge_steer.models.train import TrainConfig, fit
    from edge_steer.sim.demos import training_batches
    from edge_steer.sim.tasks import tasks_by_split

    tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    console.print(f"pretraining {type(model).__name__} on {ds.num_episodes} episodes / {len(ds)} frames of "
                  f"{len(ds.tasks)} tasks; {sum(p.numel() for p in model.parameters()):,} parameters")
    ds.preload()
    try:
        make_batches = training_batches(ds, batch_size, model.config.chunk, seed, scene_aux)
    except ValueError as e:
        _fail(f"--scene-aux needs demos recorded in sim: {e}")
    result = fit(model, list(model.parameters()), make_batches, tcfg, out, resume=resume)
    model.save_pretrained(out / "model")
    console.print(f"trained {result.steps} steps, final loss {result.final_loss:.4f}, "
                  f"{result.samples_per_s:.0f} samples/s ({'bf16' if result.bf16 else 'fp32'}); "
                  f"model saved to {out / 'model'}")
    if eval_episodes:
        run_eval(partial(load_model, out / "model"), tasks_by_split("base"), eval_episodes,
                 seed, workers, out / "eval.json")


def run_eval(load, tasks, episodes: int, seed: int, workers: int, out_json: Path | None,
             gif: Path | None = None, execute: int = 5, ensemble: float | None = None,
             instruction: str | None = None, evaluate=None) -> list:
    """evaluate under a progress bar, the success table printed, the GIF and JSON log written; the summary."""
    from edge_steer.sim.rollout import episode_log, save_gif, success_summary
    if evaluate is None:   # the local pool; a cluster's evaluate is passed in (eval --executor ray)
        from edge_steer.sim.rollout import evaluate

    t0 = time.perf_counter()
    with _progress() as prog:
        bar = prog.add_task("eval episodes", total=episodes * len(tasks))
        results = evaluate(load, tasks, episodes, seed, workers=workers, gif_first=gif is not None,
                           on_result=lambda r: prog.advance(bar), execute=execute, ensemble=ensemble,
                           instruction=instruction)
    told = ["instructed", "95 % CI"] if instruction is not None else []
    table = Table("task", "split", "success" if not told else "own task", "95 % CI", *told, "mean steps")
    summary = success_summary(results, tasks, instructed=instruction is not None)
    for row in summary:
        rs = [r for r in results if r.task == row["task"]]
        k, n, (lo, hi) = row["successes"], row["episodes"], row["ci95"]
        cells = []
        if told:   # counted over the scenes where the instructed task can be done
            ki, ni, (ilo, ihi) = row["instructed_successes"], row["instructed_episodes"], row["instructed_ci95"]
            cells = [f"{ki}/{ni} ({100 * ki / ni:.0f} %)", f"{100 * ilo:.0f}-{100 * ihi:.0f} %"] \
                if ni else ["not doable in these scenes", "-"]
        table.add_row(row["task"], row["split"], f"{k}/{n} ({100 * k / n:.0f} %)", f"{100 * lo:.0f}-{100 * hi:.0f} %",
                      *cells, f"{sum(r.steps for r in rs) / n:.0f}")
    console.print(table)
    console.print(f"{len(results)} episodes in {time.perf_counter() - t0:.0f} s")
    if gif is not None:
        frames = next((r.frames for r in results if r.frames), None)
        if frames:
            save_gif(frames, str(gif))
            console.print(f"GIF of one episode: {gif}")
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(episode_log(results, summary, execute, ensemble, instruction), indent=1))
        console.print(f"per-episode log: {out_json}")
    return summary


def eval_cmd(model: Optional[Path] = typer.Option(None, help="checkpoint directory (default: embedded model)"),
             task: str = typer.Option(..., help="task name, comma-separated names, or base / heldout / v2-base / v2-heldout"),
             episodes: int = typer.Option(50, min=1), seed: int = typer.Option(0),
             workers: int = typer.Option(2, min=1), out: Optional[Path] = typer.Option(None, help="per-episode JSON log"),
             gif: Optional[Path] = typer.Option(None, help="write a GIF of the first episode"),
             execute: int = typer.Option(5, min=1, help="actions of each chunk executed before re-planning"),
             ensemble: Optional[float] = typer.Option(None, min=0.0,
                                                      help="ACT temporal-ensemble decay (off by default)"),
             instruction: Optional[str] = typer.Option(None, help="tell the policy this instead of each task's own; "
                                                       "reports the instructed task's success where it can be done"),
             executor: str = typer.Option("local", help="local (a process pool of --workers) or ray (docs/cluster.md)"),
             ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join (default: an embedded local Ray)")
             ) -> None:
    """Closed-loop evaluation in the sim (realtime=False): success rate with a 95 % Wilson interval."""
    from functools import partial

    from edge_steer.models import DEFAULT_MODEL_DIR, CheckpointError, load_model
    from edge_steer.sim.tasks import TaskError, resolve_tasks

    path = model or DEFAULT_MODEL_DIR
    try:
        load_model(path)  # fail here, with the reason, rather than in a worker
        tasks = resolve_tasks(task)
    except (CheckpointError, TaskError) as e:
        _fail(str(e))
    if instruction is not None:
        from edge_steer.sim.tasks import parse_instruction
        if not instruction.strip():
            _fail("--instruction is empty")
        ents, rels = parse_instruction(instruction)
        asked = " ".join([*(e.name for e in ents[:1]), *sorted(rels), *(e.name for e in ents[1:2])])
        console.print(f"instruction {instruction!r} asks for " + (f"{asked}; its success is reported in the scenes "
                      "that hold both, once each" if len(ents) == 2 and len(rels) == 1 else "no object, relation "
                      "and target: only each scene's own task is reported"), markup=False)
    if executor == "local" and not ray_address:
        run_eval(partial(load_model, path), tasks, episodes, seed, workers, out, gif, execute, ensemble, instruction)
        return
    from edge_steer.bench import executors
    try:
        cluster = executors.make(executor, ray_address, workers)
    except ValueError as e:
        _fail(str(e))
    try:
        run_eval(partial(load_model, path), tasks, episodes, seed, workers, out, gif, execute, ensemble,
                 instruction, evaluate=lambda load, *a, workers, **kw: executors.ray_evaluate(cluster, path, *a, **kw))
    finally:
        cluster.shutdown()
