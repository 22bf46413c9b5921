"""The few-shot adaptation benchmark: zero-shot vs steer vs LoRA vs full fine-tuning on held-out variants.

For every (variant, seed): record the largest K of expert demos once (demo seeds), then for each K
take the first K episodes; steer identifies heads on those K demos only; every method gets the same
steps, batch size and learning rate; every fine-tuned model is evaluated closed loop on evaluation
seeds disjoint from the demo seeds, and optionally under test-time perturbations none trained on.
Fine-tunes run in a spawned process each, so their peak memory (max RSS) is measured per run.

A run is plan -> execute -> report: `plan` lists what is left as units (demo sets, fits, evaluation batches)
with their dependencies, `execute` runs them on an executor (`edge_steer.bench.executors`: the local pool or a
Ray cluster) and folds each result into cells.json as it finishes, and `summarise` / `markdown` / `plot` render
the cells. `--dry-run` prints the plan and its price (docs/cluster.md).

Ablations vary one thing of the steer arm: the number of heads, which slices train, and how heads
are chosen (attribution / exact mean ablation / factor patching / probe / random), at one K and the first
seed. Learning-rate arms run for every fine-tuning method, so each method can be compared at its own best
rate. Grid arms (`method:arm`, e.g. steer:whole=stem.0 or full:lr=0.0001) are candidate recipes: they run
on every K and seed like the main arms, and under the perturbations, so one command makes the whole table.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edge_steer.bench.docs import this_machine
from edge_steer.files import atomic_write_text

METHODS = ("zero-shot", "steer", "lora", "full")
SELECTIONS = ("attribution", "ablation", "patching", "probe", "random")
# test-time perturbations no arm trained on (Task.vary changes); wide_spawn draws object positions up to 5 cm
# beyond every side of the region the demos were recorded in
PERTURBATIONS = {"dim_light": {"lighting": "dim"}, "distractors": {"distractors": 4},
                 "camera_jitter": {"camera_jitter": 0.03}, "wide_spawn": {"spawn_margin": 0.05}}


@dataclass(frozen=True)
class AdaptConfig:
    variants: tuple[str, ...] = ()               # empty: every held-out task
    shots: tuple[int, ...] = (5, 10, 20)
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    episodes: int = 50                           # closed-loop evaluation episodes per cell
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    top_k: int = 6
    selection: str = "attribution"
    slices: str = "qo"
    lora_rank: int = 16
    perturb_episodes: int = 0                    # per perturbation and cell; 0: no robustness runs
    perturb_shots: int | None = None             # the K whose cells get them (None: every K; zero-shot always)
    ablations: bool = False                      # k / slices / selection sweeps at one K and the sweep seeds
    ablation_k: tuple[int, ...] = (2, 4, 8, 12)
    ablation_slices: tuple[str, ...] = ("o", "qkvo")
    ablation_lr: tuple[float, ...] = (3e-3, 1e-4)  # for steer, LoRA and full alike (1e-4: full FT's own scale)
    ablation_whole: tuple[str, ...] = ("stem.0",)  # steer + one module trained whole (the first conv layer)
    arms: tuple[str, ...] = ()                   # run only these ablation arms (e.g. "select=random"); empty: all
    ablation_shots: int | None = None            # the K the ablation sweeps run at (None: the smallest)
    ablation_seeds: tuple[int, ...] = ()         # the seeds they run on (empty: the first of `seeds`)
    ablation_episodes: int | None = None         # their evaluation episodes per cell (None: `episodes`)
    grid_arms: tuple[str, ...] = ()              # "method:arm" run on every K and seed, like "main"
    workers: int = 2
    isolate: bool = True                         # each fine-tune in its own process (per-run peak memory)
    model: str | None = None                     # base checkpoint (None: the embedded default)
    # a cell evaluated on fewer episodes than asked whose model is gone (runs/ lost) is fitted again and
    # evaluated afresh; fine-tunes are not bitwise reproducible, so its old episodes cannot be kept
    refit: bool = False

    @property
    def sweep_shots(self) -> int:
        """The K the ablation sweeps run at."""
        return self.ablation_shots or min(self.shots)

    @property
    def sweep_seeds(self) -> tuple[int, ...]:
        """The seeds the ablation sweeps run on (of those this run covers)."""
        return self.ablation_seeds or self.seeds[:1]

    def episodes_for(self, method: str, arm: str) -> int:
        """Evaluation episodes per cell: `episodes` for the main and grid arms, `ablation_episodes` for sweeps."""
        return self.episodes if on_grid(self, method, arm) else (self.ablation_episodes or self.episodes)

    @classmethod
    def quick(cls, **kw) -> "AdaptConfig":
        # in-process and single-worker: spawning processes costs more than the few episodes it runs
        base = dict(variants=("purple_cylinder_in_yellow_bowl",), shots=(5,), seeds=(0,), episodes=4, steps=20,
                    batch_size=16, perturb_episodes=0, workers=1, isolate=False)
        return cls(**{**base, **kw})


@dataclass
class Cell:
    variant: str
    factor: str
    shots: int
    method: str
    seed: int
    arm: str = "main"                       # main | k=<n> | slices=<s> | select=<m> | lr=<x> | whole=<module>
    successes: int = 0
    episodes: int = 0
    trainable_params: int = 0
    finetune_s: float = 0.0
    peak_rss_mb: float = 0.0
    final_loss: float = float("nan")
    heads: list[str] = field(default_factory=list)
    robustness: dict[str, list[int]] = field(default_factory=dict)   # perturbation -> [successes, episodes]
    episode_log: list[dict] = field(default_factory=list)
    base_model: str = ""                    # fingerprint of the base checkpoint it was measured on ("": not kept)
    eval_s: float = 0.0                     # wall seconds of the evaluation episodes timed (clean and perturbed)
    eval_episodes: int = 0                  # how many episodes eval_s covers (0 in cells from before it was kept)
    machine: str = ""                       # the CPU whose seconds finetune_s and eval_s are ("": not recorded)


class ForeignCells(ValueError):
    """cells.json holds cells measured on another base model than this run's: resuming would pool the two."""


# ------------------------------------------------------------------------------------------------
# one fine-tune, in its own process
# ------------------------------------------------------------------------------------------------
def _finetune_job(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    from edge_steer.data import Dataset, EpisodeFilter
    from edge_steer.models import load_model
    from edge_steer.models.heads import HeadRef
    from edge_steer.models.interface import layer_count
    from edge_steer.steering.finetune import FinetuneConfig, finetune, save_result, with_train
    from edge_steer.steering.identify import IdentifyConfig, identify, probe_set
    from edge_steer.sim.tasks import TASKS

    if args["isolate"]:
        torch.set_num_threads(args["threads"])
    base = load_model(args["model"])
    demos = Dataset(args["demos"], EpisodeFilter(limit=args["shots"]))
    out = Path(args["out"])
    heads, doc = None, None
    if args["method"] == "steer":
        if args["top_k"] == 0:                  # a whole-module arm without heads: what the module alone does
            heads, doc = [], {"method": "none", "selected": []}
        elif args["selection"] == "random":
            # one draw per (variant, seed): pooled over variants, the control averages over several draws
            rng = np.random.default_rng([args["seed"], zlib.crc32(args["variant"].encode())])
            n_layers, n_heads, _ = layer_count(base.heads())
            flat = rng.choice(n_layers * n_heads, args["top_k"], replace=False)
            heads = [HeadRef(int(i) // n_heads, int(i) % n_heads) for i in flat]
            doc = {"method": "random", "selected": [{"head": str(h)} for h in heads]}
        else:
            others = sorted({t.instruction for t in TASKS.values()})
            ps = probe_set(base, demos, 128, args["seed"], others)
            icfg = IdentifyConfig(method=args["selection"], top_k=args["top_k"], exact=args["selection"] != "attribution"
                                  and args["selection"] != "probe", batch_size=32)
            doc = identify(base, ps, icfg, demos={"path": args["demos"], "shots": args["shots"]})
            heads = [HeadRef(s["layer"], s["index"]) for s in doc["selected"]]
    cfg = with_train(FinetuneConfig(method=args["method"], slices=args["slices"], whole=tuple(args["whole"]),
                                    lora_rank=args["lora_rank"]),
                     steps=args["steps"], batch_size=args["batch_size"], lr=args["lr"], seed=args["seed"],
                     checkpoint_every=10**9)
    t0 = time.perf_counter()
    res = finetune(base, demos, cfg, out / "run", heads=heads, heads_doc=doc, progress=False)
    seconds = time.perf_counter() - t0
    save_result(res, out)
    return {"trainable_params": res.trainable_params, "finetune_s": seconds, "final_loss": res.train.final_loss,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "heads": [str(h) for h in heads or []], "model_dir": str(out / "model")}


def _call(fn, arg, isolate: bool):
    if not isolate:
        return fn(arg)
    from edge_steer.sim.demos import process_pool
    with process_pool(1) as pool:
        return pool.submit(fn, arg).result()


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def ablation_arms(cfg: AdaptConfig) -> list[tuple[str, dict[str, Any]]]:
    """The steer arms to run: "main", then (with ablations) one arm per changed setting, optionally
    narrowed to `cfg.arms`. Raises ValueError naming the valid arms."""
    arms: list[tuple[str, dict[str, Any]]] = [("main", {})]
    if cfg.ablations:
        arms += [(f"k={k}", {"top_k": k}) for k in cfg.ablation_k if k != cfg.top_k]
        arms += [(f"slices={s}", {"slices": s}) for s in cfg.ablation_slices if s != cfg.slices]
        arms += [(f"select={m}", {"selection": m}) for m in SELECTIONS if m != cfg.selection]
        arms += [(f"lr={lr:g}", {"lr": lr}) for lr in cfg.ablation_lr if lr != cfg.lr]
        arms += [(f"whole={m}", {"whole": (m,)}) for m in cfg.ablation_whole]
    if cfg.arms:
        known = {a for a, _ in arms}
        extra = [(a, _parse_arm(a)) for a in cfg.arms if a not in known and cfg.ablations]
        if unknown := set(cfg.arms) - known - {a for a, c in extra if c is not None}:
            raise ValueError(f"unknown ablation arms {sorted(unknown)}; choose from {[a for a, _ in arms[1:]]}, "
                             "or k=<n>, lr=<x>, select=<m>, slices=<s>, whole=<module>[+<module>], joined by '&'"
                             + ("" if cfg.ablations else " (with --ablations)"))
        arms = [a for a in arms if a[0] == "main" or a[0] in cfg.arms] + [a for a in extra if a[1] is not None]
    return arms


def grid_arms(cfg: AdaptConfig) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """The grid arms by method: "steer:<arm>" with any arm `_parse_arm` takes, "lora:" / "full:" with
    learning-rate arms only (the other settings are steer's). Raises ValueError naming the bad ones."""
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    bad = []
    for name in dict.fromkeys(cfg.grid_arms):
        method, _, arm = name.partition(":")
        change = _parse_arm(arm) if method in METHODS[1:] else None
        if change is None or (method != "steer" and set(change) != {"lr"}):
            bad.append(name)
        else:
            out.setdefault(method, []).append((arm, change))
    if bad:
        raise ValueError(f"unknown grid arms {bad}; write method:arm, e.g. steer:whole=stem.0 or full:lr=0.0001 "
                         "(steer takes k=, lr=, select=, slices=, whole= joined by '&'; lora and full take lr= only)")
    return out


def arm_name(method: str, arm: str) -> str:
    """How an arm is named across methods, as in --grid-arms and the summary: "lora", "steer:whole=stem.0"."""
    return method if arm == "main" else f"{method}:{arm}"


def on_grid(cfg: AdaptConfig, method: str, arm: str) -> bool:
    """Whether the arm runs on every K and seed: the main arms and the grid arms."""
    return arm == "main" or arm_name(method, arm) in cfg.grid_arms


def measures_robustness(cfg: AdaptConfig, method: str, arm: str, shots: int) -> bool:
    """Whether a cell of `method`'s `arm` at K = `shots` is also run under the perturbations: the main arms
    and the grid arms (candidate recipes, whose robustness is part of the case for them), not the ablation
    sweeps; at `perturb_shots` only, if set (zero-shot, which does not depend on K, at any)."""
    at_k = cfg.perturb_shots is None or shots == cfg.perturb_shots or method == "zero-shot"
    return cfg.perturb_episodes > 0 and on_grid(cfg, method, arm) and at_k


def missing_perturbations(cfg: AdaptConfig, cell: Cell) -> list[str]:
    """The perturbations asked of `cell` (see `measures_robustness`) that it has not been run under yet."""
    if not measures_robustness(cfg, cell.method, cell.arm, cell.shots):
        return []
    return [n for n in PERTURBATIONS if n not in cell.robustness]


def _parse_arm(name: str) -> dict[str, Any] | None:
    """An arm outside the default sweeps, by its name: k=<n>, lr=<x>, select=<m>, slices=<s> or
    whole=<module>[+<module>], or several joined by '&' (e.g. whole=stem.0&select=random: the recipe's
    random-head control; whole=stem.0&k=0: the module alone, no heads). The module is checked against the
    model when the fine-tune starts. None if it is not one."""
    change: dict[str, Any] = {}
    for part in name.split("&"):
        one = _parse_setting(part)
        if one is None or set(one) & set(change):
            return None
        change.update(one)
    if change.get("top_k") == 0 and not change.get("whole"):
        return None                                    # nothing would train
    return change


def _parse_setting(name: str) -> dict[str, Any] | None:
    key, _, value = name.partition("=")
    try:
        if key == "k" and int(value) >= 0 and name == f"k={int(value)}":
            return {"top_k": int(value)}
        if key == "lr" and float(value) > 0 and name == f"lr={float(value):g}":
            return {"lr": float(value)}
    except ValueError:
        return None
    if key == "select" and value in SELECTIONS:
        return {"selection": value}
    if key == "slices" and value and not set(value) - set("qkvo"):
        return {"slices": value}
    if key == "whole" and value and all(value.split("+")):
        return {"whole": tuple(value.split("+"))}
    return None


def method_arms(arms: list[tuple[str, dict[str, Any]]], method: str) -> list[tuple[str, dict[str, Any]]]:
    """The arms a method runs: steer all of them; the other fine-tunes "main" and the learning-rate arms;
    zero-shot, which trains nothing, only "main"."""
    if method == "steer":
        return arms
    if method == "zero-shot":
        return arms[:1]
    return [a for a in arms if a[0] == "main" or set(a[1]) == {"lr"}]


# ------------------------------------------------------------------------------------------------
# plan: what is left to measure, as independent units with their dependencies
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Unit:
    """One independent piece of work: record a demo set, fit one cell's model, or run evaluation episodes of
    one cell (clean ones from scene `first` on, or all of one perturbation's). `after`: the units whose outputs
    it reads. `inputs` name the spec's fields that are folders it reads, `output` the one it writes: what an
    executor on other machines ships (see edge_steer.bench.executors)."""
    id: str
    kind: str                                   # "demos" | "fit" | "eval"
    spec: dict[str, Any]
    cell: tuple = ()                            # the key of the cell it measures (a demo set: none)
    after: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    output: str | None = None


@dataclass
class Plan:
    """Every unit `cfg` asks for that the measured cells lack, in an order that runs each after its inputs."""
    units: list[Unit]
    cells: dict[tuple, Cell]                    # the measured cells, in the order they ran
    fresh: dict[tuple, Cell]                    # the cells the units make (a refit one replaces the measured one)
    results_file: Path
    notes: list[str] = field(default_factory=list)   # what the run says before it starts
    skipped: int = 0                            # cells short of episodes whose model is gone, left without --refit
    adopted: bool = False                       # cells without a base-model fingerprint were marked: write them back

    def work(self) -> Counter[str]:
        """What is left, counted as the dry run has always said it."""
        work: Counter[str] = Counter()
        for u in self.units:
            if u.kind == "demos":
                work["demo sets"] += 1
            elif u.kind == "fit":
                work[f"{u.spec['method']} fine-tunes"] += 1
            else:
                work["perturbed episodes" if u.spec["perturbation"] else "episodes"] += u.spec["n"]
        if self.skipped:
            work["cells short of episodes or robustness runs, left without --refit"] += self.skipped
        return work


def plan(cfg: AdaptConfig, out_dir: str | Path, episode_batch: int | None = None) -> Plan:
    """The units left to run for `cfg` in `out_dir` (reads cells.json and the demo sets; runs and writes nothing).
    `episode_batch`: clean evaluation episodes per unit (None: one unit per cell, its episodes run together).
    Raises ForeignCells for cells of another base model, FinetuneError for a --whole module the model lacks."""
    from edge_steer.models import DEFAULT_MODEL_DIR, load_model
    from edge_steer.sim.tasks import get_task, tasks_by_split

    out = Path(out_dir)
    here = this_machine()
    base_dir = Path(cfg.model) if cfg.model else DEFAULT_MODEL_DIR
    # a variant named twice runs once, in the order first named
    variants = [get_task(v) for v in dict.fromkeys(cfg.variants)] if cfg.variants else tasks_by_split("heldout")
    results_file = out / "cells.json"
    cells = {_key(c): c for c in _load_cells(results_file)}   # in the order they ran
    # every cell names the weights it was measured on, so a new default checkpoint cannot be pooled with
    # (or extend) cells of the old one; cells from before the fingerprint was kept are adopted once, and said so
    base = load_model(base_dir)   # loaded once: its fingerprint here, its modules for --whole below
    base_fp = base.fingerprint()
    _refuse_foreign(cells.values(), base_fp, results_file, base_dir)
    p = Plan([], cells, {}, results_file)
    if legacy := [c for c in cells.values() if not c.base_model]:
        p.notes.append(f"{len(legacy)} cells in {results_file} carry no base-model fingerprint (recorded before it "
                       f"was kept); they are taken as measured on this run's base model {base_fp[:12]} and marked so")
        for c in legacy:
            c.base_model = base_fp
        p.adopted = True

    def evaluations(cell: Cell, model_dir: Path, task, after: tuple[str, ...]) -> None:
        """The evaluation episodes the cell lacks (all of them for a new cell), extending a cell run on fewer
        episodes with the next scenes, then the perturbations it lacks (for the arms `measures_robustness` picks)."""
        key, have = _key(cell), cell.episodes
        todo = cfg.episodes_for(cell.method, cell.arm) - have
        step = episode_batch or max(todo, 1)
        for first in range(have, have + max(todo, 0), step):
            n = min(step, have + todo - first)
            p.units.append(Unit(f"eval:{_label(cell)}:{first}", "eval", {
                "model": str(model_dir), "task": task.name, "seed": cell.seed, "first": first, "n": n,
                "perturbation": None, "workers": cfg.workers}, key, after, ("model",)))
        for name in missing_perturbations(cfg, cell):
            p.units.append(Unit(f"eval:{_label(cell)}:{name}", "eval", {
                "model": str(model_dir), "task": task.name, "seed": cell.seed, "first": 0, "n": cfg.perturb_episodes,
                "perturbation": name, "workers": cfg.workers}, key, after, ("model",)))

    arms, grid = ablation_arms(cfg), grid_arms(cfg)
    if len(arms) > 1 and cfg.sweep_shots not in cfg.shots:     # a slice of the grid at other K or seeds: not an error
        p.notes.append(f"the ablation arms run at K = {cfg.sweep_shots}, which this run does not include; only main "
                       "and grid arms run")
    elif len(arms) > 1 and not set(cfg.sweep_seeds) & set(cfg.seeds):
        p.notes.append(f"the ablation arms run on seeds {list(cfg.sweep_seeds)}, which this run does not include; "
                       "only main and grid arms run")
    if whole := {m for _, change in arms + grid.get("steer", []) for m in change.get("whole", ())}:
        from edge_steer.steering.finetune import whole_slices
        whole_slices(base, tuple(sorted(whole)))   # a wrong name fails before hours of work
    for task in variants:
        for seed in cfg.seeds:
            demos = out / "demos" / f"{task.name}_seed{seed}"
            # recorded when the first fit needs them: a (variant, seed) whose cells are all done needs none
            demos_unit: tuple[str, ...] | None = () if _demo_count(demos) >= max(cfg.shots) else None
            for k in cfg.shots:
                for method in cfg.methods:
                    sweep = method_arms(arms, method)
                    recipes = [a for a in grid.get(method, []) if a[0] not in dict(sweep)]
                    for arm, change in sweep + recipes:
                        if not on_grid(cfg, method, arm) and (k != cfg.sweep_shots or seed not in cfg.sweep_seeds):
                            continue
                        if method == "zero-shot" and k != min(cfg.shots):
                            continue                   # zero-shot does not depend on K: one cell per (variant, seed)
                        cell = Cell(task.name, task.factor or "", k, method, seed, arm, base_model=base_fp, machine=here)
                        if method == "zero-shot":      # a cell recorded at any K is this one
                            cell.shots = next((key[1] for key in list(cells) + list(p.fresh) if key[0] == task.name
                                               and key[2] == method and key[3] == seed), k)
                        run_dir = out / "runs" / f"{task.name}_K{k}_{method}_{arm}_s{seed}"
                        if (old := cells.get(_key(cell))) is not None:   # done, but perhaps on fewer episodes or without the robustness asked now
                            model_dir = base_dir if method == "zero-shot" else run_dir / "model"
                            if model_dir.exists():
                                evaluations(old, model_dir, task, ())
                                continue
                            want = cfg.episodes_for(method, arm)
                            missing = missing_perturbations(cfg, old)
                            if old.episodes >= want and not missing:
                                continue
                            if not cfg.refit:
                                p.skipped += 1
                                p.notes.append(f"{_label(old)}: {old.episodes} of {want} episodes"
                                               + (f", not yet run under {', '.join(missing)}" if missing else "")
                                               + f", and its model is not in {run_dir}; --refit fits it again")
                                continue
                            runs = " and the robustness runs asked" if measures_robustness(cfg, method, arm, k) else ""
                            p.notes.append(f"{_label(old)}: fitting again for {want} episodes{runs} (its model is gone; "
                                           f"the {old.episodes} old episodes and any robustness runs are replaced)")
                        p.fresh[_key(cell)] = cell
                        if method == "zero-shot":
                            evaluations(cell, base_dir, task, ())
                            continue
                        if demos_unit is None:
                            # a set recorded for a smaller K is re-recorded whole: same seed, same first episodes
                            p.units.append(Unit(f"demos:{task.name}:{seed}", "demos", {
                                "task": task.name, "n": max(cfg.shots), "seed": 10_000 + seed, "out": str(demos),
                                "workers": cfg.workers}, output="out"))
                            demos_unit = (p.units[-1].id,)
                        fit = Unit(f"fit:{_label(cell)}", "fit", {
                            "model": str(base_dir), "variant": task.name, "demos": str(demos), "shots": k,
                            "method": method, "seed": seed, "steps": cfg.steps, "batch_size": cfg.batch_size,
                            "lr": change.get("lr", cfg.lr), "top_k": change.get("top_k", cfg.top_k),
                            "selection": change.get("selection", cfg.selection),
                            "slices": change.get("slices", cfg.slices), "whole": change.get("whole", ()),
                            "lora_rank": cfg.lora_rank, "threads": cfg.workers, "isolate": cfg.isolate,
                            "out": str(run_dir)}, _key(cell), demos_unit, ("model", "demos"), "out")
                        p.units.append(fit)
                        evaluations(cell, run_dir / "model", task, (fit.id,))
    return p


# ------------------------------------------------------------------------------------------------
# execute: units on an executor, results into cells.json as each finishes (one writer: this process)
# ------------------------------------------------------------------------------------------------
def run_unit(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one unit where it is (any process of any machine that sees its folders) and return its result."""
    t0 = time.perf_counter()
    if kind == "demos":
        from edge_steer.sim.demos import generate_demos
        from edge_steer.sim.env import EnvConfig
        shutil.rmtree(spec["out"], ignore_errors=True)
        generate_demos(spec["task"], spec["n"], spec["seed"], spec["out"], EnvConfig(), workers=spec["workers"])
        return {"seconds": time.perf_counter() - t0, "machine": this_machine()}
    if kind == "fit":
        res = _call(_finetune_job, spec, spec["isolate"])
        return {**res, "machine": this_machine()}
    from edge_steer.models import load_model
    from edge_steer.sim.rollout import evaluate
    from edge_steer.sim.tasks import get_task
    task = get_task(spec["task"])
    if spec["perturbation"]:
        task = task.vary(**PERTURBATIONS[spec["perturbation"]])
    res = evaluate(partial(load_model, Path(spec["model"])), [task], spec["n"], spec["seed"],
                   workers=spec["workers"], first=spec["first"])
    return {"episodes": [{"seed": r.seed, "success": r.success, "steps": r.steps} for r in res],
            "seconds": time.perf_counter() - t0, "machine": this_machine()}


def execute(p: Plan, executor, say: Callable[[str], None] = print) -> list[Cell]:
    """Run the plan's units on `executor` (edge_steer.bench.executors), folding each result into its cell and
    writing cells.json as each unit finishes, so a run killed at any point resumes from what finished. A result
    is applied once: a batch of episodes the cell already counts, or a perturbation it already has, is dropped."""
    cells = p.cells
    left = Counter(u.cell for u in p.units if u.cell)
    early: dict[tuple, dict[int, list[dict]]] = {}      # clean batches that finished before the ones before them

    def save() -> None:
        # resumable after a crash: a run killed mid-write (a session's end) leaves the last complete file
        p.results_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p.results_file, json.dumps([asdict(c) for c in cells.values()], indent=1))

    if p.adopted:
        save()

    def cell_of(key: tuple) -> Cell:
        """The cell a unit measures; a fresh one enters cells.json (last, or in place of its refit) on its first result."""
        if key in p.fresh and cells.get(key) is not p.fresh[key]:
            cells.pop(key, None)
            cells[key] = p.fresh[key]
        return cells[key]

    def started(unit: Unit) -> None:
        if unit.kind == "demos":
            say(f"recording {unit.spec['n']} demos of {unit.spec['task']} (seed {unit.spec['seed'] - 10_000})")

    def done(unit: Unit, res: dict[str, Any]) -> None:
        if unit.kind == "demos":
            return
        cell = cell_of(unit.cell)
        if unit.kind == "fit":
            for key in ("trainable_params", "finetune_s", "peak_rss_mb", "final_loss", "heads"):
                setattr(cell, key, res[key])
            cell.machine = res.get("machine", cell.machine)
        elif _apply_episodes(cell, unit.spec, res["episodes"], early.setdefault(unit.cell, {})):
            if res.get("machine") == cell.machine:   # what --dry-run's estimate is made of; never one cell's seconds from two machines
                cell.eval_s += res["seconds"]
                cell.eval_episodes += len(res["episodes"])
        save()
        left[unit.cell] -= 1
        if left[unit.cell] == 0:
            if unit.cell in p.fresh:
                say(f"{_label(cell)}: {cell.successes}/{cell.episodes}" + (
                    f", {cell.trainable_params:,} params, {cell.finetune_s:.0f} s" if cell.method != "zero-shot" else ""))
            else:
                say(f"{_label(cell)} extended: {cell.successes}/{cell.episodes}" + (
                    "; robustness: " + ", ".join(f"{n} {s}/{e}" for n, (s, e) in cell.robustness.items())
                    if cell.robustness else ""))

    executor.run(p.units, run_unit, started, done)
    return list(cells.values())


def _apply_episodes(cell: Cell, spec: dict[str, Any], episodes: list[dict], early: dict[int, list[dict]]) -> bool:
    """Fold one evaluation unit's episodes into its cell, once: clean scenes in their order (a batch that finishes
    before the ones before it waits), a perturbation whole. False for a result the cell already counts."""
    if spec["perturbation"]:
        if spec["perturbation"] in cell.robustness:
            return False
        cell.robustness[spec["perturbation"]] = [sum(e["success"] for e in episodes), len(episodes)]
        return True
    if spec["first"] < cell.episodes or spec["first"] in early:
        return False
    early[spec["first"]] = episodes
    while cell.episodes in early:
        batch = early.pop(cell.episodes)
        cell.successes += sum(e["success"] for e in batch)
        cell.episodes += len(batch)
        cell.episode_log += batch
    return True


def run(cfg: AdaptConfig, out_dir: str | Path, say: Callable[[str], None] = print, dry_run: bool = False,
        executor=None, cluster: int | None = None) -> list[Cell]:
    """Every cell `cfg` asks for that `out_dir/cells.json` lacks, or has on fewer episodes or perturbations, on
    `executor` (default: the local pool of `cfg.workers`). `dry_run`: only say what that is (demo sets, fine-tunes,
    episodes) and what it costs, on `cluster` workers if given, running and writing nothing."""
    from edge_steer.bench.executors import LocalExecutor

    executor = executor or LocalExecutor()
    p = plan(cfg, out_dir, executor.episode_batch)
    if dry_run:
        for line in dry_run_report(p, cluster):
            say(line)
        return list(p.cells.values())
    for note in p.notes:
        say(note)
    return execute(p, executor, say)


def dry_run_report(p: Plan, cluster: int | None = None) -> list[str]:
    """What a dry run says: what is left and how long it takes at the measured rates (on `cluster` workers too)."""
    work, done = p.work(), [c for k, c in p.cells.items() if k not in p.fresh]
    lines = ["dry run, nothing run or written; left to do: "
             + (", ".join(f"{n} {what}" for what, n in sorted(work.items())) or "nothing")
             + (f"; {_estimate(work, done, this_machine())}" if work else "")]
    return lines + ([price(p, done, cluster)] if cluster and p.units else [])


def describe(p: Plan) -> list[str]:
    """The plan, one line per (variant, seed): its demo set, fits by method and evaluation episodes."""
    rows: dict[tuple, Counter[str]] = {}
    for u in p.units:
        variant, seed = (u.spec["task"], u.spec["seed"] - 10_000) if u.kind == "demos" else (u.cell[0], u.cell[3])
        row = rows.setdefault((variant, seed), Counter())
        what = {"demos": "demo set", "fit": f"{u.spec.get('method')} fit"}.get(u.kind) or (
            "perturbed episodes" if u.spec["perturbation"] else "episodes")
        row[what] += u.spec["n"] if u.kind == "eval" else 1
        row["units"] += 1
    return [f"{variant} seed {seed}: " + ", ".join(f"{n} {what}" for what, n in sorted(c.items()))
            for (variant, seed), c in rows.items()]


def price(p: Plan, cells: Iterable[Cell], workers: int) -> str:
    """The plan's wall time on `workers` parallel workers (one unit each; a free worker takes the first unit in plan
    order whose inputs are done), at the rates the cells measured: a clean or perturbed episode at its measured wall seconds
    times the cores of the machine that timed it (the cells' episodes ran one per core), a fit at its method's
    median. Demo sets are not timed and count as free."""
    import heapq

    cells = list(cells)
    here = this_machine()
    mine = [c for c in cells if c.machine == here]
    basis = mine if any(c.eval_episodes for c in mine) else cells
    timed = [c for c in basis if c.eval_episodes]
    if not timed:
        return f"on {workers} worker{'s' if workers > 1 else ''}: no cell here is timed yet, so no estimate"
    per_core = sum(c.eval_s * _cores(c.machine) for c in timed) / sum(c.eval_episodes for c in timed)
    fits = {m: sorted(c.finetune_s for c in basis if c.method == m and c.finetune_s > 0) for m in METHODS}

    def cost(u: Unit) -> float:
        if u.kind == "fit":
            f = fits.get(u.spec["method"]) or [0.0]
            return f[len(f) // 2]
        return per_core * u.spec["n"] if u.kind == "eval" else 0.0

    # as the Ray executor runs it: whenever a worker is free, the first unit in plan order whose inputs are done
    finish: dict[str, float] = {}
    waiting, running, now = list(p.units), [], 0.0
    while waiting or running:
        ready = [u for u in waiting if all(a in finish for a in u.after)][:workers - len(running)]
        for u in ready:
            heapq.heappush(running, (now + cost(u), u.id))
        if ready:
            started = {u.id for u in ready}
            waiting = [u for u in waiting if u.id not in started]
        now, uid = heapq.heappop(running)
        finish[uid] = now
    took = max(finish.values(), default=0.0)
    took_s = f"{took / 3600:.1f} h" if took >= 3600 else f"{took / 60:.0f} min"
    return (f"on {workers} worker{'s' if workers > 1 else ''}: about {took_s} for {len(p.units)} units ({per_core:.1f} s an episode on one core, "
            "fits at their method's median, each unit on one worker, after its inputs; demo sets not counted)")


def _cores(machine: str) -> int:
    """The cores a cell's machine description names ("AMD EPYC, 2 cores, AVX512"); 1 where it names none."""
    for part in machine.split(","):
        if part.strip().endswith(" cores") and part.split()[0].isdigit():
            return int(part.split()[0])
    return 1



def _estimate(work: Counter[str], cells: Iterable[Cell], here: str) -> str:
    """How long `work` takes at the rates the cells measured: seconds per evaluation episode over every timed
    episode, and each method's median fit time, from the cells of this machine where it has timed any (another
    session's VM may be 3x slower or faster), else from all cells, and then it says so. Demo sets are not timed;
    where a rate is missing (no timed cell, or no fit of that method), it says so instead of assuming one."""
    cells = list(cells)
    mine = [c for c in cells if c.machine == here]
    basis = mine if any(c.eval_episodes for c in mine) else cells
    timed = [c for c in basis if c.eval_episodes]
    if not timed:
        return "no cell here is timed yet (cells from before 2026-12-07 are not), so no estimate"
    per_episode = sum(c.eval_s for c in timed) / sum(c.eval_episodes for c in timed)
    seconds = per_episode * (work["episodes"] + work["perturbed episodes"])
    untimed = []
    for what, n in work.items():
        if what.endswith(" fine-tunes"):
            fits = sorted(c.finetune_s for c in basis if c.method == what.split()[0] and c.finetune_s > 0)
            if fits:
                seconds += n * fits[len(fits) // 2]
            else:
                untimed.append(what)
    untimed += ["demo sets"] if work["demo sets"] else []
    took = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"
    where = "on this machine" if basis is mine else "on other machines (none timed on this one)"
    return (f"about {took} at the rates these cells measured {where} ({per_episode:.1f} s an episode over "
            f"{sum(c.eval_episodes for c in timed)} timed episodes, each method's median fit)"
            + (f", not counting {' and '.join(untimed)}" if untimed else ""))


def _demo_count(root: Path) -> int:
    """Episodes committed in a recorded demo set; 0 when there is none (or only an interrupted start)."""
    from edge_steer.data import layout
    return int(layout.read_info(root)["total_episodes"]) if (root / "meta" / "info.json").exists() else 0


def _label(c: Cell) -> str:
    return f"{c.variant} K={c.shots} {c.method} arm {c.arm} seed {c.seed}"


def _key(c: Cell) -> tuple:
    return (c.variant, c.shots, c.method, c.seed, c.arm)


def _load_cells(path: Path) -> list[Cell]:
    if not path.exists():
        return []
    return [Cell(**d) for d in json.loads(path.read_text())]


def _refuse_foreign(cells: Iterable[Cell], base_fp: str, results_file: Path, base_dir: Path) -> None:
    if foreign := Counter(c.base_model for c in cells if c.base_model not in ("", base_fp)):
        raise ForeignCells(
            f"{results_file} holds cells measured on another base model ("
            + ", ".join(f"{n} on {fp[:12]}" for fp, n in foreign.items())
            + f"); this run's is {base_fp[:12]} ({base_dir}). Pass that checkpoint as --model, or use another --out.")


def measured(cfg: AdaptConfig, out_dir: str | Path) -> list[Cell]:
    """The cells already in `out_dir/cells.json`, for the tables and plots of a run that is not finished
    (`--report`): nothing runs or is written, and a file measured on another base model is refused."""
    from edge_steer.models import DEFAULT_MODEL_DIR, load_model

    results_file = Path(out_dir) / "cells.json"
    cells = _load_cells(results_file)
    if not cells:
        raise FileNotFoundError(f"no measured cells in {results_file}: run the benchmark there first "
                                "(or copy the committed docs/results/*_cells.json there)")
    base_dir = Path(cfg.model) if cfg.model else DEFAULT_MODEL_DIR
    _refuse_foreign(cells, load_model(base_dir).fingerprint(), results_file, base_dir)
    return cells


# ------------------------------------------------------------------------------------------------
# tables and plots
# ------------------------------------------------------------------------------------------------
def _first_successes(c: Cell, n: int) -> float:
    """Successes in a cell's first `n` clean episodes (its rate times n where no per-episode log was kept)."""
    if len(c.episode_log) >= n:
        return float(sum(e["success"] for e in c.episode_log[:n]))
    return n * c.successes / max(1, c.episodes)


def summarise(cells: list[Cell], grid: tuple[str, ...] = ()) -> dict[str, Any]:
    """Pooled success with a Wilson 95 % interval per (factor, K, method) of the main arms and the grid
    arms (`grid`, "method:arm", each a row of its own), the zero-shot row repeated for every K; plus
    resource means per method and the ablation rows (every other arm)."""
    from edge_steer.sim.rollout import wilson_interval

    def label(c: Cell) -> str:
        return arm_name(c.method, c.arm)

    main = [c for c in cells if c.arm == "main" or label(c) in grid]
    labels = [m for m in METHODS if any(c.method == m for c in main)] + [g for g in dict.fromkeys(grid)
                                                                        if any(label(c) == g for c in main)]
    shots = sorted({c.shots for c in main if c.method != "zero-shot"}) or sorted({c.shots for c in main})
    rows = []
    for factor in sorted({c.factor for c in main}):
        for k in shots:
            for method in labels:
                sel = [c for c in main if c.factor == factor and label(c) == method
                       and (c.shots == k or method == "zero-shot")]
                if not sel:
                    continue
                s, n = sum(c.successes for c in sel), sum(c.episodes for c in sel)
                lo, hi = wilson_interval(s, n)
                rob, rob_clean = {}, {}
                for name in PERTURBATIONS:
                    rs = [(c, c.robustness[name]) for c in sel if name in c.robustness]
                    if rs:
                        rob[name] = sum(r[0] for _, r in rs) / max(1, sum(r[1] for _, r in rs))
                        # clean success on the same scenes (perturbed episode i is clean episode i, varied), so a
                        # drop is measured where the perturbation was, not against cells or seeds it never ran on
                        rob_clean[name] = sum(_first_successes(c, r[1]) for c, r in rs) / max(1, sum(r[1] for _, r in rs))
                rows.append({"factor": factor, "shots": k, "method": method, "success": s / max(n, 1),
                             "ci": [lo, hi], "n": n, "cells": len(sel),
                             "trainable_params": float(np.mean([c.trainable_params for c in sel])),
                             "finetune_s": float(np.mean([c.finetune_s for c in sel])),
                             # "" where a cell's machine was not recorded: a mean over machines compares machines
                             "fit_machines": sorted({c.machine for c in sel if c.method != "zero-shot"}),
                             "peak_rss_mb": float(np.mean([c.peak_rss_mb for c in sel])), "robustness": rob,
                             "robustness_clean": rob_clean})
    ablations = []
    for method in METHODS[1:]:
        changed = sorted({c.arm for c in cells if c.method == method and c.arm != "main" and label(c) not in grid})
        # the main arm on exactly the (variant, K, seed) cells the ablations ran on, and on their first scenes
        # (a sweep may run fewer episodes than the grid): a paired reference, whatever else the file holds
        where: dict[tuple, int] = {}
        for c in cells:
            if c.method == method and c.arm in changed:
                at = (c.variant, c.shots, c.seed)
                where[at] = min(where.get(at, c.episodes), c.episodes)
        for arm in changed + (["main"] if changed else []):
            sel = [c for c in cells if c.arm == arm and c.method == method
                   and (arm != "main" or (c.variant, c.shots, c.seed) in where)]
            if not sel:
                continue
            if arm == "main":
                s, n = 0, 0
                for c in sel:
                    m = where[(c.variant, c.shots, c.seed)]
                    if m >= c.episodes:
                        s, n = s + c.successes, n + c.episodes
                    elif len(c.episode_log) >= m:
                        s, n = s + sum(e["success"] for e in c.episode_log[:m]), n + m
                    else:
                        raise ValueError(f"{_label(c)} has no per-episode log to pair with its ablations' {m} episodes")
            else:
                s, n = sum(c.successes for c in sel), sum(c.episodes for c in sel)
            ablations.append({"arm": arm if method == "steer" else f"{method}: {arm}", "method": method,
                              "success": s / max(n, 1), "ci": list(wilson_interval(s, n)), "n": n,
                              "trainable_params": float(np.mean([c.trainable_params for c in sel])),
                              "final_loss": float(np.mean([c.final_loss for c in sel]))})
    return {"rows": rows, "ablations": ablations, "base_models": sorted({c.base_model for c in cells if c.base_model})}


def plot(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))     # METHODS, then the grid arms
    paths = []
    factors = sorted({r["factor"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(factors)), figsize=(4.2 * max(1, len(factors)), 3.4), squeeze=False)
    for ax, factor in zip(axes[0], factors):
        for method in methods:
            rs = sorted((r for r in rows if r["factor"] == factor and r["method"] == method), key=lambda r: r["shots"])
            if not rs:
                continue
            x = [r["shots"] for r in rs]
            y = [100 * r["success"] for r in rs]
            err = [[100 * (r["success"] - r["ci"][0]) for r in rs], [100 * (r["ci"][1] - r["success"]) for r in rs]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
        ax.set_title(f"{factor} variants")
        ax.set_xlabel("demonstrations K")
        ax.set_ylabel("success %")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / "adapt_success_vs_k.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    rob = [r for r in rows if r["robustness"]]
    if rob:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        names = list(PERTURBATIONS)
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            rs = [r for r in rob if r["method"] == method]
            if not rs:
                continue
            drops = [100 * np.mean([r["robustness_clean"][n] - r["robustness"][n] for r in rs if n in r["robustness"]]
                                   or [np.nan]) for n in names]
            ax.bar(np.arange(len(names)) + i * width, drops, width, label=method)
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
        ax.set_ylabel("success drop on the same scenes (pp)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        p = out_dir / "adapt_robustness.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def pools_machines(machines: Iterable[str]) -> bool:
    """Whether fit times measured on `machines` (one per cell; "" where a cell does not say) pool machines."""
    machines = set(machines)
    return len(machines) > 1 or "" in machines


POOLED_FIT_TIMES = ("fit times over more than one machine, or on machines the cells do not record (before "
                    "2026-12-07): sessions' VMs differ about 3x in speed, so compare fit times within one run, not "
                    "across these rows.")


def markdown(summary: dict[str, Any], cfg: AdaptConfig, command: str, commit: str) -> str:
    lines = [f"Command: `{command}` at commit `{commit}`.", "",
             f"Config: {len(cfg.variants) or 'all'} variants, K in {list(cfg.shots)}, seeds {list(cfg.seeds)}, "
             f"{cfg.episodes} evaluation episodes per cell, {cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr}, "
             f"steer top-{cfg.top_k} heads by {cfg.selection}, slices {cfg.slices}, LoRA rank {cfg.lora_rank} on q/k/v/o."
             + (f" Base model (weights fingerprint): {', '.join(f[:12] for f in bases)}."
                if (bases := summary.get("base_models")) else ""), ""]
    has_rob = any(r["robustness"] for r in summary["rows"])
    for factor in sorted({r["factor"] for r in summary["rows"]}):
        lines += [f"#### {factor} variants", "",
                  "| K | method | success | 95 % CI | episodes | trainable params | fine-tune s | peak RSS MB |"
                  + (f" robustness, clean → perturbed on the same scenes ({' / '.join(PERTURBATIONS)}) |" if has_rob else ""),
                  "|---|---|---|---|---|---|---|---|" + ("---|" if has_rob else "")]
        for r in summary["rows"]:
            if r["factor"] != factor:
                continue
            rob = ""
            if has_rob:
                rob = " " + " / ".join(f"{100 * r['robustness_clean'][n]:.0f} → {100 * r['robustness'][n]:.0f} %"
                                       if n in r["robustness"] else "–"
                                       for n in PERTURBATIONS) + " |"
            lines.append(f"| {r['shots']} | {r['method']} | {100 * r['success']:.1f} % | "
                         f"{100 * r['ci'][0]:.0f}–{100 * r['ci'][1]:.0f} % | {r['n']} | {r['trainable_params']:,.0f} | "
                         f"{r['finetune_s']:.0f}{' †' if pools_machines(r['fit_machines']) else ''} | {r['peak_rss_mb']:.0f} |{rob}")
        lines.append("")
    if any(pools_machines(r["fit_machines"]) for r in summary["rows"]):
        lines += [f"† {POOLED_FIT_TIMES}", ""]
    if summary["ablations"]:
        seeds = ", ".join(map(str, cfg.sweep_seeds))
        lines += [f"#### Ablations (K = {cfg.sweep_shots}, seeds {seeds}, {cfg.ablation_episodes or cfg.episodes} episodes per "
                  "cell, the main arm on the same scenes; steer unless named)", "",
                  "| arm | success | 95 % CI | episodes | trainable params | mean final train loss |",
                  "|---|---|---|---|---|---|"]
        for a in summary["ablations"]:
            lines.append(f"| {a['arm']} | {100 * a['success']:.1f} % | {100 * a['ci'][0]:.0f}–{100 * a['ci'][1]:.0f} % "
                         f"| {a['n']} | {a['trainable_params']:,.0f} | {a.get('final_loss', float('nan')):.4f} |")
        lines.append("")
    return "\n".join(lines)


def with_overrides(cfg: AdaptConfig, **kw) -> AdaptConfig:
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
