"""Compare fine-tune arms of an adaptation run episode by episode.

    python tools/compare_adapt.py docs/results/adapt13_cells.json --shots 10 --seeds 0,1,2 --ref steer:whole=stem.0 \
        [--variants A,B] [--plot PNG] [--k-plot PNG] [--robust-plot PNG] [--skip N] [--first N]

For every (method, arm) that ran on all the (variant, seed) cells the reference ran on, prints successes
per variant, the pooled rate with a Wilson 95 % interval, trainable parameters and fine-tune seconds, and a
two-sided sign test against the reference on the episodes only one of the two solves. Every arm shares the
evaluation scenes of its (variant, seed), which is what makes the pairing valid. `--first N` cuts every cell
to its first N episodes (the same N scenes in every arm), so a 50-episode reference and 20-episode ablation
arms are pooled over the same scenes; `--skip N` drops the first N (for scenes no choice was made on).
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from collections import Counter
from dataclasses import replace
from math import comb
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_steer.bench.adapt import PERTURBATIONS, POOLED_FIT_TIMES, _load_cells, pools_machines  # noqa: E402
from edge_steer.sim.rollout import wilson_interval             # noqa: E402


def sign_test(a: int, b: int) -> float:
    """Two-sided exact binomial test of a against b discordant pairs (p = 0.5)."""
    n, k = a + b, min(a, b)
    return 1.0 if n == 0 else min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cells", type=Path)
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ref", default="steer:main", help="method:arm every other arm is paired against")
    ap.add_argument("--plot", type=Path, help="write a PNG: success per variant and pooled, for --plot-arms")
    ap.add_argument("--plot-arms", default="zero-shot:main,steer:main,lora:main")
    ap.add_argument("--variants", help="comma-separated: only these variants (default: every one the reference ran)")
    ap.add_argument("--skip", type=int, help="drop each cell's first N episodes (cells left empty are dropped): "
                    "scenes a choice was not made on")
    ap.add_argument("--first", type=int, help="use only each cell's first N episodes (the same scenes in every arm)")
    ap.add_argument("--k-plot", type=Path, help="write a PNG: pooled success vs K for --plot-arms, at every K "
                    "where they all ran the reference's cells")
    ap.add_argument("--robust-plot", type=Path, help="write a PNG: pooled success clean and under each test-time "
                    "perturbation, for --plot-arms")
    args = ap.parse_args()
    seeds = {int(s) for s in args.seeds.split(",")}
    all_cells = _load_cells(args.cells)
    if args.variants:
        wanted = set(args.variants.split(","))
        all_cells = [c for c in all_cells if c.variant in wanted]
        if not all_cells:
            raise SystemExit(f"no cells for variants {sorted(wanted)}")
    # pairing and pooling are only meaningful on one base model (cells name the one they were measured on)
    if len(bases := Counter(c.base_model for c in all_cells)) > 1:
        raise SystemExit("these cells were measured on more than one base model: "
                         + ", ".join(f"{n} on {fp[:12] or 'an unrecorded one'}" for fp, n in bases.items()))
    if args.skip or args.first:   # cells left without episodes (all skipped) are dropped
        start = args.skip or 0
        stop = start + args.first if args.first else None
        all_cells = [c for c in (episodes_slice(c, start, stop) for c in all_cells) if c.episodes]
    by_arm = arm_cells(all_cells, args.shots, seeds)
    ref = tuple(args.ref.split(":", 1))
    if ref not in by_arm:
        raise SystemExit(f"no cells for {args.ref} at K = {args.shots}, seeds {sorted(seeds)}; have {sorted(by_arm)}")
    keys = sorted(by_arm[ref])
    variants = sorted({v for v, _ in keys})
    base = next(iter(bases))[:12] or "not recorded"
    print(f"K = {args.shots}, seeds {sorted(seeds)}, {len(keys)} cells, base model {base}; variants: {', '.join(variants)}")
    print(f"{'method:arm':28s} " + " ".join(f"{v[:10]:>10s}" for v in variants)
          + "   pooled        95% CI    params  ft s     vs ref  p")
    pooled_any = False
    for (method, arm), got in sorted(by_arm.items()):
        if not ran_all(by_arm, (method, arm), keys):
            continue
        per_var = {v: sum(got[k].successes for k in keys if k[0] == v) for v in variants}
        s, n = counts([got[k] for k in keys])
        lo, hi = wilson_interval(s, n)
        only_this = only_ref = 0
        for k in keys:
            mine = {e["seed"]: e["success"] for e in got[k].episode_log}
            theirs = {e["seed"]: e["success"] for e in by_arm[ref][k].episode_log}
            for seed in mine.keys() & theirs.keys():
                only_this += mine[seed] and not theirs[seed]
                only_ref += theirs[seed] and not mine[seed]
        fitted = [got[k] for k in keys if got[k].method != "zero-shot"]
        ft = [c.finetune_s for c in fitted]
        pooled = pools_machines(c.machine for c in fitted)
        pooled_any |= pooled
        print(f"{method + ':' + arm:28s} " + " ".join(f"{per_var[v]:>10d}" for v in variants)
              + f"   {s:3d}/{n} {100 * s / n:5.1f} %  {100 * lo:3.0f}-{100 * hi:3.0f} %"
              + f"  {int(got[keys[0]].trainable_params):>8,d}"
              + (f"  {min(ft):3.0f}-{max(ft):3.0f}{'†' if pooled else ' '}" if ft else "       -")
              + ("" if (method, arm) == ref else f"  {only_this:3d}/{only_ref:<3d} {sign_test(only_this, only_ref):.3f}"))
    if pooled_any:
        print(textwrap.fill(f"† {POOLED_FIT_TIMES}", 118))
    robustness(by_arm, keys)
    plot_arms = [tuple(a.split(":", 1)) for a in args.plot_arms.split(",")]
    title = f"K = {args.shots}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, sorted(seeds)))}"
    if args.plot:
        plot(by_arm, keys, plot_arms, args.plot, title)
    if args.k_plot:
        k_plot(all_cells, seeds, ref, plot_arms, args.k_plot)
    if args.robust_plot:
        robust_plot(by_arm, keys, plot_arms, args.robust_plot, title)


def episodes_slice(cell, start: int, stop: int | None):
    """The cell cut to its evaluation episodes [start:stop] (robustness runs, a separate set, are kept)."""
    log = cell.episode_log[start:stop]
    return replace(cell, episode_log=log, episodes=len(log), successes=sum(e["success"] for e in log))


def arm_cells(cells: list, shots: int, seeds: set[int]) -> dict[tuple[str, str], dict]:
    """(method, arm) -> {(variant, seed): cell} at K = `shots` (zero-shot at any K: it does not depend on K)."""
    by_arm: dict[tuple[str, str], dict] = {}
    for c in cells:   # the last cell wins where a results file holds a rerun
        if c.seed in seeds and (c.shots == shots or c.method == "zero-shot"):
            by_arm.setdefault((c.method, c.arm), {})[(c.variant, c.seed)] = c
    return by_arm


def ran_all(by_arm: dict, arm: tuple[str, str], keys: list) -> bool:
    """Whether `arm` ran every (variant, seed) cell in `keys` (the reference's)."""
    return arm in by_arm and all(k in by_arm[arm] for k in keys)


def counts(cells: list) -> tuple[int, int]:
    """(successes, episodes) over `cells`."""
    return sum(c.successes for c in cells), sum(c.episodes for c in cells)


def rate_ci(s: int, n: int) -> tuple[float, float, float]:
    """Success rate s / n and its Wilson 95 % interval."""
    lo, hi = wilson_interval(s, n)
    return s / n, lo, hi


def pooled(cells: list) -> tuple[float, float, float]:
    """Success rate and its Wilson 95 % interval over the episodes of `cells`."""
    return rate_ci(*counts(cells))


def robust_counts(by_arm: dict, arm: tuple[str, str], keys: list) -> dict[str, tuple[int, int]]:
    """{"clean", then each perturbation every cell in `keys` ran: (successes, episodes)} pooled over `keys`;
    {} where `arm` did not run every cell or no perturbation on all of them."""
    if not ran_all(by_arm, arm, keys):
        return {}
    got = by_arm[arm]
    names = [n for n in PERTURBATIONS if all(n in got[k].robustness for k in keys)]
    if not names:
        return {}
    return {"clean": counts([got[k] for k in keys]),
            **{n: tuple(map(sum, zip(*(got[k].robustness[n] for k in keys)))) for n in names}}


def robustness(by_arm: dict, keys: list) -> None:
    """Pooled success under each test-time perturbation, for the arms that ran some on every cell ('-' where
    an arm lacks one another arm ran)."""
    rows = [(arm, cols) for arm in sorted(by_arm) if (cols := robust_counts(by_arm, arm, keys))]
    if not rows:
        return
    names = [n for n in ("clean", *PERTURBATIONS) if any(n in cols for _, cols in rows)]
    print("\nunder test-time perturbations (pooled over the same cells):")
    print(f"{'method:arm':28s} " + " ".join(f"{n:>16s}" for n in names))
    for (method, arm), cols in rows:
        print(f"{method + ':' + arm:28s} " + " ".join(
            f"{f'{cols[n][0]}/{cols[n][1]} {100 * cols[n][0] / cols[n][1]:4.1f} %' if n in cols else '-':>16s}"
            for n in names))


def k_plot(cells: list, seeds: set[int], ref: tuple[str, str], arms: list[tuple[str, str]], path: Path) -> None:
    """Lines: each arm's pooled success vs K, with Wilson 95 % intervals, over the K values where every
    arm ran every (variant, seed) cell the reference ran."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[tuple[str, str], list] = {a: [] for a in arms}
    ks = []
    for k in sorted({c.shots for c in cells if c.method != "zero-shot"}):
        by_arm = arm_cells(cells, k, seeds)
        keys = sorted(by_arm.get(ref, {}))
        if not keys or not all(ran_all(by_arm, a, keys) for a in arms):
            continue
        ks.append(k)
        for a in arms:
            points[a].append(pooled([by_arm[a][key] for key in keys]))
    if not ks:
        raise SystemExit(f"--k-plot: no K at which {arms} all ran the cells of {':'.join(ref)}")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for a, pts in points.items():
        rate = [p[0] for p in pts]
        ax.errorbar(ks, rate, yerr=[[p[0] - p[1] for p in pts], [p[2] - p[0] for p in pts]], capsize=3,
                    marker="o", label=":".join(a).replace(":main", ""))
    ax.set_xticks(ks)
    ax.set_xlabel("demonstrations K")
    ax.set_ylabel("closed-loop success (pooled)")
    ax.set_ylim(0, 1)
    ax.set_title(f"held-out variants, seeds {', '.join(map(str, sorted(seeds)))} (95 % Wilson)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"k-plot: {path} (K = {', '.join(map(str, ks))})")


def plot(by_arm: dict, keys: list, arms: list[tuple[str, str]], path: Path, title: str) -> None:
    """Grouped bars: each arm's success per variant and pooled, with Wilson 95 % intervals."""
    missing = [a for a in arms if not ran_all(by_arm, a, keys)]
    if missing:
        raise SystemExit(f"--plot-arms {missing} did not run on every cell of the reference")
    groups = sorted({v for v, _ in keys}) + ["pooled"]
    bars({arm: {g: counts([by_arm[arm][k] for k in keys if g in ("pooled", k[0])]) for g in groups} for arm in arms},
         path, f"held-out variants, {title} (bars: 95 % Wilson interval)")


def robust_plot(by_arm: dict, keys: list, arms: list[tuple[str, str]], path: Path, title: str) -> None:
    """Grouped bars: each arm's pooled success clean and under each perturbation all of them ran, with Wilson
    95 % intervals."""
    cols = {arm: robust_counts(by_arm, arm, keys) for arm in arms}
    missing = [a for a, c in cols.items() if not c]
    if missing:
        raise SystemExit(f"--plot-arms {missing} lack robustness runs on some cell of the reference")
    shared = [n for n in cols[arms[0]] if all(n in c for c in cols.values())]
    if shared == ["clean"]:
        raise SystemExit(f"--plot-arms {arms} ran no perturbation in common on every cell")
    bars({a: {n: c[n] for n in shared} for a, c in cols.items()}, path,
         f"held-out variants pooled, {title} (bars: 95 % Wilson interval)")


def bars(groups_by_arm: dict[tuple[str, str], dict[str, tuple[int, int]]], path: Path, title: str) -> None:
    """Grouped bars of success rates: one group per key of the inner dicts, one bar per arm, Wilson 95 %
    intervals from the (successes, episodes) counts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(groups_by_arm)
    groups = list(groups_by_arm[arms[0]])
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 2, 4))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        rates, errs = [], [[], []]
        for g in groups:
            rate, lo, hi = rate_ci(*groups_by_arm[arm][g])
            rates.append(rate)
            errs[0].append(rate - lo)
            errs[1].append(hi - rate)
        ax.bar([j + (i - (len(arms) - 1) / 2) * width for j in range(len(groups))], rates, width, yerr=errs,
               capsize=2, label=":".join(arm).replace(":main", ""))
    ax.set_xticks(range(len(groups)), [textwrap.fill(g.replace("_", " "), 20) for g in groups], fontsize=8)
    ax.set_ylabel("closed-loop success")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
