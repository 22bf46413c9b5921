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
bench_app = typer.Typer(help="Benchmarks that write their results into docs/.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console(soft_wrap=True)  # long paths and messages stay on one line in logs


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code=2)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


@tasks_app.command("list")
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


@demos_app.command("generate")
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
    from edge_steer.sim.demos import Takeover, generate_demos
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
    t0 = time.perf_counter()
    totals = {"saved": 0, "failed": 0, "skipped": 0, "policy_faults": 0, "already": 0}
    with _progress() as prog:
        bar = prog.add_task(f"demos {task}", total=episodes * len(names))

        def tick(ep):
            if ep.success:
                prog.advance(bar)

        for name in names:
            env = EnvConfig(image_size=image_size) if start_noise is None else \
                EnvConfig(image_size=image_size, start_noise=start_noise)
            summary = generate_demos(name, episodes, seed, out, env, workers=workers or None,
                                     keep_failed=keep_failed, on_episode=tick, perturb=perturb, takeover=handover,
                                     resume=resume)
            prog.advance(bar, summary["already"])
            totals = {k: v + summary[k] for k, v in totals.items()}
    dt = time.perf_counter() - t0
    finished = (f", {totals['skipped']} finished by the policy before the handover, {totals['policy_faults']} "
                f"where the policy tripped a reflex first") if handover else ""
    there = f"{totals['already']} already there, " if resume else ""
    console.print(f"saved {totals['saved']} episodes to {out} ({there}{totals['failed']} expert failures{finished}, "
                  f"{dt:.1f} s, {60 * totals['saved'] / dt:.1f} episodes/min)")


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


@app.command("pretrain")
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
    from edge_steer.models.configuration_hfvla import DEFAULT_LAYERS, DEFAULT_VISION, TowerError, backbone_tower, vision_tower
    from edge_steer.models.modeling_hfvla import HFVLA
    try:
        bb = backbone_tower(backbone)
        vt = vision_tower(vision or DEFAULT_VISION.get(backbone, "siglip-small"))
        kw = {} if augment_shift is None else {"augment_shift": augment_shift}
        return HFVLA.create(bb, vt, layers or DEFAULT_LAYERS.get(backbone), **kw)
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
        _eval_report(partial(load_model, out / "model"), tasks_by_split("base"), eval_episodes,
                     seed, workers, out / "eval.json")


def _eval_report(load, tasks, episodes: int, seed: int, workers: int, out_json: Path | None,
                 gif: Path | None = None, execute: int = 5, ensemble: float | None = None,
                 instruction: str | None = None, evaluate=None) -> list:
    from edge_steer.sim.rollout import save_gif, wilson_interval
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
    summary = []
    for t in tasks:
        rs = [r for r in results if r.task == t.name]
        k = sum(r.success for r in rs)
        lo, hi = wilson_interval(k, len(rs))
        row = {"task": t.name, "split": t.split, "factor": t.factor, "successes": k, "episodes": len(rs),
               "ci95": [lo, hi]}
        cells = []
        if told:   # counted over the scenes where the instructed task can be done
            doable = [r.instructed_success for r in rs if r.instructed_success is not None]
            ki, (ilo, ihi) = sum(doable), wilson_interval(sum(doable), len(doable))
            row.update(instructed_successes=ki, instructed_episodes=len(doable), instructed_ci95=[ilo, ihi])
            cells = [f"{ki}/{len(doable)} ({100 * ki / len(doable):.0f} %)", f"{100 * ilo:.0f}-{100 * ihi:.0f} %"] \
                if doable else ["not doable in these scenes", "-"]
        table.add_row(t.name, t.split, f"{k}/{len(rs)} ({100 * k / len(rs):.0f} %)", f"{100 * lo:.0f}-{100 * hi:.0f} %",
                      *cells, f"{sum(r.steps for r in rs) / len(rs):.0f}")
        summary.append(row)
    console.print(table)
    console.print(f"{len(results)} episodes in {time.perf_counter() - t0:.0f} s")
    if gif is not None:
        frames = next((r.frames for r in results if r.frames), None)
        if frames:
            save_gif(frames, str(gif))
            console.print(f"GIF of one episode: {gif}")
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        told_json = {} if instruction is None else {"instruction": instruction}
        log = [{"task": r.task, "seed": r.seed, "success": r.success, "steps": r.steps,
                **({} if instruction is None else {"instructed_success": r.instructed_success})} for r in results]
        out_json.write_text(json.dumps({"execute": execute, "ensemble": ensemble, **told_json, "summary": summary,
                                        "episodes": log}, indent=1))
        console.print(f"per-episode log: {out_json}")
    return summary


@app.command("eval")
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
        from edge_steer.sim.tasks import task_for_instruction
        if not instruction.strip():
            _fail("--instruction is empty")
        named = task_for_instruction(instruction)
        console.print(f"instruction {instruction!r} names " + (f"the task {named.name}; its success is reported where "
                      "both its objects are in the scene" if named else "no known task: only each scene's own "
                      "task is reported"), markup=False)
    if executor == "local" and not ray_address:
        _eval_report(partial(load_model, path), tasks, episodes, seed, workers, out, gif, execute, ensemble,
                     instruction)
        return
    from edge_steer.bench import executors
    try:
        cluster = executors.make(executor, ray_address, workers)
    except ValueError as e:
        _fail(str(e))
    try:
        _eval_report(partial(load_model, path), tasks, episodes, seed, workers, out, gif, execute, ensemble,
                     instruction, evaluate=lambda load, *a, workers, **kw: executors.ray_evaluate(cluster, path, *a, **kw))
    finally:
        cluster.shutdown()


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


@app.command("identify")
def identify_cmd(model: Optional[Path] = typer.Option(None, help="checkpoint directory (default: embedded model)"),
                 demos: Path = typer.Option(..., help="few-shot demos of the new task"),
                 out: Path = typer.Option(Path("heads.json"), help="where to write the heads file"),
                 method: str = typer.Option("attribution", help="ranking: attribution | ablation | patching | probe"),
                 top_k: int = typer.Option(6, min=1), coverage: Optional[float] = typer.Option(
                     None, help="instead of top-k: the fewest heads holding this share of the total effect"),
                 max_frames: int = typer.Option(256, min=8), baseline: Optional[Path] = typer.Option(
                     None, help="frames of other tasks for the mean-ablation baseline (default: the demos)"),
                 probe: str = typer.Option("ridge", help="ridge | knn"),
                 exact: bool = typer.Option(True, help="also run exact ablation/patching and report agreement"),
                 seed: int = typer.Option(0)) -> None:
    """Score every attention head on the demos and select the ones that mediate the task."""
    from edge_steer.data import DatasetError
    from edge_steer.sim.tasks import TASKS
    from edge_steer.steering.identify import IdentifyConfig, IdentifyError, identify, probe_set

    m = _load(model)
    ds = _demos(demos, m)
    try:
        cfg = IdentifyConfig(method=method, top_k=top_k, coverage=coverage, max_frames=max_frames, probe=probe,
                             exact=exact, seed=seed)
        others = sorted({t.instruction for t in TASKS.values()})
        ps = probe_set(m, ds, cfg.max_frames, seed, others)
        base_ps = probe_set(m, _demos(baseline, m), cfg.max_frames, seed) if baseline else None
        with _progress() as prog:
            bar = prog.add_task("identify", total=None)
            doc = identify(m, ps, cfg, base_ps, demos={"path": str(demos)},
                           progress=lambda msg: prog.update(bar, description=f"identify: {msg}"))
    except (IdentifyError, DatasetError) as e:   # DatasetError: a damaged frame past the first ones
        _fail(str(e))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    table = Table("head", "score", "factors", title=f"selected heads ({method}, {len(ps)} frames)")
    for s in doc["selected"]:
        table.add_row(s["head"], f"{s['score']:.4g}", ", ".join(s["factors"]) or "-")
    console.print(table)
    if doc["agreement"]:
        a = doc["agreement"]["ablation"]
        t = doc["timing"]
        console.print(f"attribution vs exact ablation: Spearman {a['spearman']:.2f}, top-{a['k']} overlap "
                      f"{a['topk_overlap']:.2f}; passes {t['attribution_passes']:.0f} vs exhaustive "
                      f"{t['exhaustive_passes']:.0f}")
    console.print(f"heads file: {out}")


@app.command("finetune")
def finetune_cmd(model: Optional[Path] = typer.Option(None, help="base checkpoint (default: embedded model)"),
                 demos: Path = typer.Option(..., help="few-shot demos of the new task"),
                 method: str = typer.Option("steer", help="steer | lora | full"),
                 heads: Optional[Path] = typer.Option(None, help="heads.json from identify (steer)"),
                 out: Path = typer.Option(..., help="run directory: model/, steering.safetensors, finetune.json"),
                 slices: str = typer.Option("qo", help="steer: which of q, k, v, o slices train"),
                 whole: str = typer.Option("", help="steer: modules also trained whole, comma-separated (e.g. stem.0)"),
                 lora_rank: int = typer.Option(16, min=1), steps: int = typer.Option(300, min=1),
                 batch_size: int = typer.Option(32, min=1), lr: float = typer.Option(1e-3),
                 seed: int = typer.Option(0), deterministic: bool = typer.Option(False),
                 resume: bool = typer.Option(False, help="continue from a checkpoint in OUT")) -> None:
    """Fine-tune on few-shot demos: only the selected heads (steer), LoRA, or every weight (full)."""
    from edge_steer.data import DatasetError
    from edge_steer.steering.finetune import FinetuneConfig, FinetuneError, finetune, save_result, with_train
    from edge_steer.steering.identify import IdentifyError, selected_heads

    m = _load(model)
    ds = _demos(demos, m)
    try:
        cfg = with_train(FinetuneConfig(method=method, slices=slices, whole=tuple(w for w in whole.split(",") if w),
                                        lora_rank=lora_rank), steps=steps,
                         batch_size=batch_size, lr=lr, seed=seed, deterministic=deterministic)
        doc, refs = None, None
        if method == "steer":
            if heads is None or not heads.is_file():
                _fail("steer fine-tuning needs --heads (a heads.json written by `edge-steer identify`)")
            doc = json.loads(heads.read_text())
            refs = selected_heads(doc, m)
        res = finetune(m, ds, cfg, out, heads=refs, heads_doc=doc, resume=resume)
    except (FinetuneError, IdentifyError, DatasetError, FloatingPointError, json.JSONDecodeError) as e:
        _fail(str(e))
    from edge_steer.models.distributed import is_main
    if not is_main():        # under torchrun every process holds the same result: the first one writes it
        return
    paths = save_result(res, out)
    console.print(f"{method}: {res.trainable_params:,} trainable parameters, {res.train.steps} steps, final loss "
                  f"{res.train.final_loss:.4f}, {res.train.seconds:.0f} s; " + ", ".join(f"{k}: {v}" for k, v in paths.items()))


@app.command("apply")
def apply_cmd(steering: Path = typer.Option(..., help="steering.safetensors from `finetune --method steer`"),
              out: Path = typer.Option(..., help="where to write the steered checkpoint"),
              model: Optional[Path] = typer.Option(None, help="base checkpoint (default: embedded model)")) -> None:
    """Merge a steering delta into its base model (refuses any other base model)."""
    from edge_steer.steering.delta import DeltaError, SteeringDelta

    m = _load(model)
    try:
        delta = SteeringDelta.load(steering)
        delta.apply_(m)
    except DeltaError as e:
        _fail(str(e))
    m.save_pretrained(out)
    console.print(f"applied {delta.num_values:,} steered values ({len(delta.tensors)} slices); model: {out}")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        _fail(f"expected comma-separated integers, got {text!r}")


@bench_app.command("adapt")
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


def _invoke(command, **given):
    """Call another command's function from Python with its CLI default for every option not given.
    A bare call would pass typer's OptionInfo placeholders as values, so each new option of that
    command would silently break this caller."""
    import inspect

    from typer.models import ParameterInfo
    args = {}
    for name, p in inspect.signature(command).parameters.items():
        if name in given:
            args[name] = given.pop(name)
            continue
        default = p.default.default if isinstance(p.default, ParameterInfo) else p.default
        if default is ... or default is inspect.Parameter.empty:
            raise TypeError(f"{command.__name__}: required option {name!r} not given")
        args[name] = default
    if given:
        raise TypeError(f"{command.__name__} has no options {sorted(given)}")
    return command(**args)


@app.command("demo")
def demo(out: Path = typer.Option(Path("runs/demo"), help="working directory for the run"),
         task: str = typer.Option("purple_cylinder_in_yellow_bowl", help="held-out variant to adapt to"),
         episodes: int = typer.Option(10, min=1, help="few-shot demonstrations to record"),
         eval_episodes: int = typer.Option(10, min=1, help="closed-loop episodes before and after steering"),
         steps: int = typer.Option(300, min=1, help="steer fine-tuning steps"),
         model: Optional[Path] = typer.Option(None, help="base checkpoint (default: embedded model)"),
         serve_seconds: float = typer.Option(60.0, help="how long the served arm may take (0: skip serving)")) -> None:
    """The main job end to end in simulation: few-shot demos of a held-out variant -> identify ->
    steer fine-tune -> report -> ONNX export -> closed-loop success before/after -> serve over ZMQ."""
    import shutil
    from functools import partial

    from edge_steer.models import DEFAULT_MODEL_DIR, load_model
    from edge_steer.runtime.engine import load_engine
    from edge_steer.sim.tasks import TaskError, get_task

    try:
        t = get_task(task)
    except TaskError as e:
        _fail(str(e))
    if out.exists():
        shutil.rmtree(out)
    base = model or DEFAULT_MODEL_DIR
    _load(base)
    console.rule(f"1/7 record {episodes} demos of {task} ({t.split}, {t.factor or 'base'} variation)")
    _invoke(demos_generate, task=task, episodes=episodes, out=out / "demos")
    console.rule("2/7 the base model on the new task (zero-shot)")
    before = _eval_report(partial(load_model, base), [t], eval_episodes, 0, 2, out / "eval_before.json")
    console.rule("3/7 identify the heads that mediate it")
    _invoke(identify_cmd, model=base, demos=out / "demos", out=out / "heads.json", method="attribution", top_k=6,
            exact=False)
    console.rule("4/7 fine-tune only those heads")
    _invoke(finetune_cmd, model=base, demos=out / "demos", method="steer", heads=out / "heads.json", out=out / "steer",
            slices="qo", steps=steps, batch_size=32, lr=1e-3, resume=False)
    _invoke(report_cmd, heads=out / "heads.json", model=base, demos=out / "demos", out=out / "report", frames=3)
    console.rule("5/7 export base + steering delta to ONNX")
    _invoke(export_cmd, model=base, steering=out / "steer" / "steering.safetensors", format="onnx",
            out=out / "steered.onnx", steerable="qo")
    console.rule("6/7 the exported, steered engine on the new task")
    after = _eval_report(partial(load_engine, out / "steered.onnx"), [t], eval_episodes, 0, 2, out / "eval_after.json")
    served = _demo_serve(out, t, out / "steered.onnx", serve_seconds) if serve_seconds > 0 else None
    console.rule("summary")
    b, a = before[0], after[0]
    console.print(f"{task}: success {b['successes']}/{b['episodes']} zero-shot -> {a['successes']}/{a['episodes']} "
                  f"after steering (ONNX engine); report: {out / 'report' / 'report.md'}")
    if served is not None:
        console.print(served)


def _demo_serve(out: Path, task, engine: Path, seconds: float) -> str:
    """Start `edge-steer serve` on the steered engine, instruct it over ZMQ, report outcome and timing."""
    from edge_steer.runtime.launch import ServeProcess

    console.rule("7/7 serve the engine in sim and send the instruction over ZMQ")
    serve = ServeProcess(out, f'[engine]\nbackend = "onnxruntime"\npath = "{engine}"\n[robot]\ntask = "{task.name}"\n')
    try:
        with serve:
            client = serve.client
            client.instruct(task.instruction)
            t0 = time.time()
            st = client.status()
            while st["state"] == "RUNNING" and time.time() - t0 < seconds:
                time.sleep(0.5)
                st = client.status()
    except (RuntimeError, TimeoutError) as e:
        return f"serve failed: {e}; see {serve.log_path}"
    (out / "serve_status.json").write_text(json.dumps(st, indent=1, default=str))
    loop = st.get("setpoint_loop", {})
    ok = (st.get("sim") or {}).get("success")
    return (f"served: '{task.instruction}' -> {'success' if ok else 'no success'} after {time.time() - t0:.1f} s "
            f"(state {st['state']}); setpoint loop: " + json.dumps({k: v for k, v in loop.items()
                                                                   if not isinstance(v, (list, dict))})
            + f"; full status: {out / 'serve_status.json'}")


@app.command("serve")
def serve(config: Optional[Path] = typer.Option(None, help="TOML config (docs/serve.md); default: --sim's config"),
          sim: bool = typer.Option(False, "--sim", help="simulated robot + cameras, default model, localhost"),
          task: Optional[str] = typer.Option(None, help="sim: the scene's task (default red_cube_on_blue_plate)"),
          engine: Optional[str] = typer.Option(None, help="override engine.backend (torch|onnxruntime|tensorrt|expert)"),
          model: Optional[Path] = typer.Option(None, help="override engine.path"),
          command: Optional[str] = typer.Option(None, help="override zmq.command endpoint"),
          telemetry: Optional[str] = typer.Option(None, help="override zmq.telemetry endpoint")) -> None:
    """Run the on-robot daemon: camera -> engine -> 1 kHz setpoints, ZMQ commands and telemetry."""
    from edge_steer.runtime.config import ConfigError, ServeConfig, load_config
    from edge_steer.runtime.serve import run

    if config is None and not sim:
        _fail("give --config FILE for a robot, or --sim for the simulated cell")
    try:
        cfg = load_config(config) if config is not None else ServeConfig.sim()
        robot = {"task": task} if task else {}
        eng = {**({"backend": engine} if engine else {}), **({"path": str(model)} if model else {})}
        zmq_ = {**({"command": command} if command else {}), **({"telemetry": telemetry} if telemetry else {})}
        cfg = cfg.with_(**{k: v for k, v in (("robot", robot), ("engine", eng), ("zmq", zmq_)) if v})
        code = run(cfg)
    except (ConfigError, RuntimeError, ValueError) as e:
        _fail(str(e))
    raise typer.Exit(code=code)


@app.command("send")
def send(text: Optional[str] = typer.Argument(None, help="instruction for the robot (starts it unless --no-start)"),
         status: bool = typer.Option(False, "--status", help="print the daemon's status"),
         start: bool = typer.Option(False, "--start", help="start / resume"),
         pause: bool = typer.Option(False, "--pause"), stop: bool = typer.Option(False, "--stop"),
         estop: bool = typer.Option(False, "--estop", help="stop the controller at once (FAULT)"),
         recover: bool = typer.Option(False, "--recover", help="leave FAULT"),
         record: Optional[str] = typer.Option(None, help="on | off: record episodes to the dataset"),
         steer: Optional[str] = typer.Option(None, help="steering task name ('' = base model)"),
         shutdown: bool = typer.Option(False, "--shutdown", help="stop the daemon"),
         no_start: bool = typer.Option(False, "--no-start", help="with TEXT: set the instruction only"),
         endpoint: str = typer.Option("tcp://127.0.0.1:5555", help="daemon command endpoint"),
         server_key: Optional[Path] = typer.Option(None, help="CURVE: the daemon's public key file (server.key)"),
         client_key: Optional[Path] = typer.Option(None, help="CURVE: this client's secret key file (*.key_secret)"),
         timeout_ms: int = typer.Option(3000, min=1), as_json: bool = typer.Option(False, "--json")) -> None:
    """Send a command to a running `edge-steer serve` (one per call)."""
    from edge_steer.client import Client, ClientError, ClientTimeout

    chosen = [(n, a) for n, a in (("instruct", {"text": text, "start": not no_start} if text else None),
                                  ("status", {} if status else None), ("start", {} if start else None),
                                  ("pause", {} if pause else None), ("stop", {} if stop else None),
                                  ("estop", {} if estop else None), ("recover", {} if recover else None),
                                  ("record", {"on": record == "on"} if record is not None else None),
                                  ("set_steering", {"task": steer} if steer is not None else None),
                                  ("shutdown", {} if shutdown else None)) if a is not None]
    if len(chosen) != 1:
        _fail("give exactly one of: TEXT, --status, --start, --pause, --stop, --estop, --recover, --record, "
              "--steer, --shutdown")
    if record is not None and record not in ("on", "off"):
        _fail("--record takes on or off")
    cmd, args = chosen[0]
    server_public = None
    if (server_key is None) != (client_key is None):
        _fail("--server-key and --client-key go together (CURVE)")
    if server_key is not None:
        import zmq.auth
        try:
            server_public = zmq.auth.load_certificate(server_key)[0]
        except (OSError, ValueError) as e:
            _fail(f"cannot read the server key {server_key}: {e}")
    with Client(endpoint, timeout_ms=timeout_ms, server_public_key=server_public,
                client_certificate=str(client_key) if client_key else None) as client:
        try:
            result = client.request(cmd, **args)
        except ClientTimeout as e:
            _fail(f"{e} (is `edge-steer serve` running?)")
        except ClientError as e:
            _fail(f"{cmd} refused: {e.code}: {e.reason}")
    if as_json or cmd == "status":
        print(json.dumps(result, indent=1, default=str))
    else:
        console.print(f"{cmd}: ok " + " ".join(f"{k}={v}" for k, v in result.items()))


@app.command("export")
def export_cmd(model: Optional[Path] = typer.Option(None, help="checkpoint directory (default: embedded model)"),
               steering: Optional[Path] = typer.Option(None, help="steering delta (.safetensors) to bake in"),
               format: str = typer.Option("onnx", "--format", help="onnx | trt"),
               out: Path = typer.Option(..., help="engine file: .onnx, or .plan for trt (its .onnx is written beside)"),
               dynamic_batch: bool = typer.Option(False, help="dynamic batch axis (default: static batch 1)"),
               steerable: str = typer.Option("qo", help="projections switchable at run time without re-export"),
               precision: str = typer.Option("fp32", help="onnx: fp32 | fp16; trt: fp32 | fp16 | bf16")) -> None:
    """Export the (steered) model to an engine with a metadata sidecar, then check it loads and predicts."""
    from edge_steer.export import EngineError, ExportError, OnnxExportConfig, export_onnx
    from edge_steer.export.onnx_export import describe
    from edge_steer.models import CheckpointError, load_model
    from edge_steer.runtime.engine import load_engine
    from edge_steer.steering.delta import DeltaError

    if format not in ("onnx", "trt"):
        _fail(f"--format must be onnx or trt, got {format!r}")
    try:
        m = load_model(model)
        onnx_out = out if format == "onnx" else out.with_suffix(".onnx")
        meta = export_onnx(m, onnx_out, steering, OnnxExportConfig(
            dynamic_batch=dynamic_batch, steerable=steerable, precision=precision if format == "onnx" else "fp32"))
        if format == "trt":
            from edge_steer.export.tensorrt import TrtBuildConfig, build_engine
            meta = build_engine(onnx_out, out, TrtBuildConfig(precision=precision))
        engine = load_engine(out)
    except (CheckpointError, DeltaError, EngineError, ExportError, ValueError) as e:
        from rich.markup import escape
        _fail(escape(str(e)))
    print(json.dumps({**describe(meta), "load_seconds": round(engine.load_seconds, 3), "sidecar": str(out) + ".json"}))


@app.command("report")
def report_cmd(heads: Path = typer.Option(..., help="heads.json written by `edge-steer identify`"),
               model: Optional[Path] = typer.Option(None, help="the checkpoint identified (default: embedded model)"),
               demos: Path = typer.Option(..., help="demos to draw the sample frames from"),
               out: Path = typer.Option(..., help="report directory: report.md, heatmap.png, attention_<head>.png"),
               frames: int = typer.Option(3, min=1, max=8, help="sample frames per attention map")) -> None:
    """Explain identified heads: effect heatmaps per factor, the top heads' attention on demo frames, a summary."""
    from edge_steer.data import DatasetError
    from edge_steer.steering.identify import IdentifyError
    from edge_steer.steering.report import ReportError, write_report

    try:
        doc = json.loads(heads.read_text())
    except (OSError, json.JSONDecodeError) as e:
        _fail(f"cannot read heads file {heads}: {e}")
    m = _load(model)
    ds = _demos(demos, m)
    try:
        with console.status("drawing the report"):
            path = write_report(doc, m, ds, out, n_frames=frames)
    except (IdentifyError, ReportError, DatasetError, KeyError) as e:
        _fail(str(e))
    console.print(f"report: {path}")


keys_app = typer.Typer(help="CURVE key pairs for remote control of `edge-steer serve`", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def keys_generate(out: Path = typer.Option(..., help="directory for NAME.key (public) and NAME.key_secret"),
                  name: str = typer.Option("server", help="key pair name: 'server', or one per operator/client")) -> None:
    """Write a CURVE key pair (zmq.auth certificate format); the secret file is readable by its owner only."""
    import os

    import zmq.auth
    if not name.isidentifier():
        _fail(f"--name must be a plain name, got {name!r}")
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    if public.exists() or secret.exists():
        _fail(f"{public} or {secret} exists already; remove it to replace the key pair")
    out.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)  # the secret is never world-readable, not even for an instant
    try:
        zmq.auth.create_certificates(str(out), name)
    finally:
        os.umask(old)
    secret.chmod(0o600)
    public.chmod(0o644)
    console.print(f"public key: {public} (give it to the other side; clients' go in zmq.curve_authorized_keys)")
    console.print(f"secret key: {secret} (mode 600; never copy it off this machine)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
