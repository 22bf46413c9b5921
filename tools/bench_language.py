"""Which language features generalise to instructions worded in a way no demo used (issue 3):
the frozen MiniLM features against the plain baseline (the same WordPiece tokens into a table the VLA
trains itself), judged closed loop in the sim on the base tasks with their training wording and with a
paraphrase of it, the same scenes for both.

    .venv/bin/python tools/bench_language.py --data runs/data/fb17 [--model DIR] [--steps 1500] [--episodes 10]

The baseline is the same model with its language input replaced: every trunk, vision and action weight
starts from the MiniLM model (`--model`, the embedded default), the token table starts fresh, and the
whole model is fine-tuned on `--data` for `--steps`. That is what a fair comparison can afford on two
cores (training either from scratch to the default's level takes two hours); it favours the baseline,
which gets the extra steps, and each model is judged by its own drop from training wording to paraphrase.
Evaluation scenes use `--seed` (default 2), never the seed-0 scenes the attempts were compared on.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import git_commit, this_machine, upsert_section  # noqa: E402

# Words and phrases of the base-task instructions, each replaced by one no base-task demo uses.
REWORDING = [("to the left of", "on the left side of"), ("to the right of", "on the right side of"),
             ("put", "place"), ("cube", "block"), ("cylinder", "can"), ("plate", "dish"), ("bowl", "basin"),
             ("on", "onto"), ("in", "into")]


def paraphrase(text: str) -> str:
    """'put the red cube on the blue plate' -> 'place the red block onto the blue dish'. Each rule
    applies once, to the training wording, so one rule's output is never rewritten by a later one."""
    out = text
    spans: list[tuple[int, int, str]] = []
    for old, new in REWORDING:
        for m in re.finditer(rf"\b{re.escape(old)}\b", text):
            if not any(a < m.end() and m.start() < b for a, b, _ in spans):
                spans.append((m.start(), m.end(), new))
    for a, b, new in sorted(spans, reverse=True):
        out = out[:a] + new + out[b:]
    return out


class Reworded:
    """A policy that hears every instruction as `rewording` says (unlisted ones as they are)."""

    def __init__(self, model_dir: str, rewording: dict[str, str]):
        from edge_steer.models import EdgeVLA
        self.model = EdgeVLA.from_pretrained(model_dir)
        self.rewording = rewording

    def predict(self, observation, instruction: str):
        return self.model.predict(observation, self.rewording.get(instruction, instruction))


def train_baseline(base_dir: Path, data: Path, out: Path, steps: int, lr: float, seed: int) -> dict:
    """The MiniLM model with an `embedding` language input, fine-tuned on `data` (resumable)."""
    import torch

    from edge_steer.data import Dataset
    from edge_steer.models import EdgeVLA
    from edge_steer.models.train import TrainConfig, fit
    from edge_steer.sim.demos import training_batches

    if (out / "model" / "config.json").exists():
        return json.loads((out / "train.json").read_text())
    base = EdgeVLA.from_pretrained(base_dir)
    model = EdgeVLA(replace(base.config, language="embedding"))
    mine = model.state_dict()
    shared = {k: v for k, v in base.state_dict().items() if k in mine and mine[k].shape == v.shape}
    missing, unexpected = model.load_state_dict(shared, strict=False)
    unexpected = sorted(set(base.state_dict()) - set(shared))   # the MiniLM-side weights left behind
    ds = Dataset(data)
    ds.preload()
    make_batches = training_batches(ds, 64, model.config.chunk, seed, bool(model.config.scene_aux))
    torch.set_num_threads(2)
    r = fit(model, list(model.parameters()), make_batches, TrainConfig(steps=steps, lr=lr, seed=seed), out)
    model.save_pretrained(out / "model")
    info = {"steps": r.steps, "final_loss": r.final_loss, "seconds": r.seconds, "fresh": sorted(missing),
            "dropped": sorted(unexpected), "episodes": ds.num_episodes}
    (out / "train.json").write_text(json.dumps(info, indent=1))
    return info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="base-task demos for the baseline's fine-tune")
    ap.add_argument("--model", default=None, help="the MiniLM model (default: the embedded one)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--episodes", type=int, default=10, help="per base task and wording")
    ap.add_argument("--seed", type=int, default=2, help="evaluation scenes (0 is the attempts' selection set)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_language")
    ap.add_argument("--docs", default="docs/model.md")
    args = ap.parse_args()

    from edge_steer.models import DEFAULT_MODEL_DIR
    from edge_steer.sim.rollout import evaluate, wilson_interval
    from edge_steer.sim.tasks import tasks_by_split

    out = Path(args.out)
    base_dir = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    t0 = time.perf_counter()
    train = train_baseline(base_dir, Path(args.data), out / "embedding", args.steps, args.lr, 0)
    tasks = tasks_by_split("base")
    reworded = {t.instruction: paraphrase(t.instruction) for t in tasks}
    models = {"minilm": str(base_dir), "embedding": str(out / "embedding" / "model")}
    rows, episodes = [], []
    for name, path in models.items():
        for wording, mapping in (("training", {}), ("paraphrase", reworded)):
            res = evaluate(partial(Reworded, path, mapping), tasks, args.episodes, args.seed, workers=args.workers)
            k = sum(r.success for r in res)
            lo, hi = wilson_interval(k, len(res))
            per = {t.name: sum(r.success for r in res if r.task == t.name) for t in tasks}
            rows.append({"language": name, "wording": wording, "successes": k, "episodes": len(res),
                         "ci95": [lo, hi], "per_task": per})
            episodes += [{"language": name, "wording": wording, "task": r.task, "seed": r.seed, "success": r.success}
                         for r in res]
            print(f"{name:9s} {wording:10s} {k}/{len(res)}", flush=True)
    result = {"model": str(base_dir), "data": args.data, "steps": args.steps, "lr": args.lr, "seed": args.seed,
              "paraphrases": reworded, "baseline_training": train, "rows": rows, "episodes": episodes,
              "seconds": time.perf_counter() - t0}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    docs = Path(args.docs).parent   # results/ and figures/ sit beside the page
    (docs / "results").mkdir(parents=True, exist_ok=True)
    (docs / "results" / "bench_language.json").write_text(json.dumps(result, indent=1))
    _plot(rows, docs / "figures" / "language_paraphrase.png")
    upsert_section(args.docs, "## Language features: what generalises to new wording\n\n" + _section(args, result))


def _section(args, result: dict) -> str:
    cmd = " ".join(["tools/bench_language.py", "--data", args.data, "--steps", str(args.steps),
                    "--episodes", str(args.episodes), "--seed", str(args.seed)])
    t = result["baseline_training"]
    lines = [f"Command: `.venv/bin/python {cmd}` at commit `{git_commit()}`, {this_machine()} "
             f"({result['seconds'] / 60:.0f} min).", "",
             f"Both models share every vision, trunk and action weight of `{Path(result['model']).name}`; the "
             f"`embedding` one replaces the frozen MiniLM features by a trained token table and was then fine-tuned "
             f"{t['steps']} steps on {t['episodes']} base-task demos (final loss {t['final_loss']:.4f}). "
             "Training wording is each task's own instruction; the paraphrase swaps words no demo used:", ""]
    lines += [f"* `{a}` -> `{b}`" for a, b in result["paraphrases"].items()]
    lines += ["", "| language | wording | success | 95 % CI (Wilson) |", "|---|---|---|---|"]
    for r in result["rows"]:
        lo, hi = r["ci95"]
        lines.append(f"| {r['language']} | {r['wording']} | {r['successes']}/{r['episodes']} "
                     f"({100 * r['successes'] / r['episodes']:.0f} %) | {100 * lo:.0f}-{100 * hi:.0f} % |")
    lines += ["", "![paraphrase](figures/language_paraphrase.png)", "",
              "Raw episodes: `results/bench_language.json`."]
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    langs = sorted({r["language"] for r in rows}, key=lambda x: x != "minilm")
    for j, wording in enumerate(("training", "paraphrase")):
        vals = [next(r for r in rows if r["language"] == lang and r["wording"] == wording) for lang in langs]
        rate = [100 * v["successes"] / v["episodes"] for v in vals]
        err = [[100 * (v["successes"] / v["episodes"] - v["ci95"][0]) for v in vals],
               [100 * (v["ci95"][1] - v["successes"] / v["episodes"]) for v in vals]]
        ax.bar([i + 0.38 * j for i in range(len(langs))], rate, 0.36, yerr=err, capsize=3, label=f"{wording} wording")
    ax.set_xticks([i + 0.19 for i in range(len(langs))], langs)
    ax.set_ylabel("base-task success (%)")
    ax.set_ylim(0, 118)
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
