"""Benchmark of the steering core (issue 4), side by side in one run on this machine:

* identification: wall time and forward passes of attribution patching vs exact (cached, batched)
  ablation/patching vs the exhaustive one-forward-per-head count; agreement (Spearman, top-k overlap);
* fine-tuning steer / lora / full on the same demos, steps, batch and learning rate: trainable
  parameters, step time, peak memory (max RSS of a fresh process per method), time to reach a loss.

    .venv/bin/python tools/bench_steering.py [--model DIR] [--task T] [--shots 10] [--steps 200]

With --hf NAME[,NAME] it also runs, for each named HFVLA (issue 45: `minilm` = the pretrained MiniLM
backbone, `smolvla` = a SmolVLA-sized configuration, random weights, tiny-* for a smoke run; or the
directory of a trained HFVLA checkpoint, whose head ranking means more than a random model's), the same
identification and steer / LoRA r16 / full fine-tunes at batch 1 (--hf-batch), each fine-tune in a
fresh process, with heads chosen once by the bench's own identification (so a fine-tune's memory is
its own). --hf-only skips the EdgeVLA section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import git_commit, this_machine, upsert_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--task", default="purple_cylinder_in_yellow_bowl")
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--frames", type=int, default=256)
    ap.add_argument("--whole", default="stem.0,keypoint_maps",
                    help="extra steer arms, each training one more module whole (comma-separated; '' for none)")
    ap.add_argument("--out", default="runs/bench_steering")
    ap.add_argument("--docs", default="docs/steering.md")
    ap.add_argument("--hf", default="", help="HFVLA configs to run as well, e.g. minilm,smolvla")
    ap.add_argument("--hf-only", action="store_true", help="skip the EdgeVLA section")
    ap.add_argument("--hf-batch", type=int, default=1)
    ap.add_argument("--hf-steps", type=int, default=20)
    ap.add_argument("--hf-frames", type=int, default=32, help="probe frames for the HFVLA identification")
    args = ap.parse_args()
    if not args.hf_only:
        edge_section(args)
    hf = [n for n in args.hf.split(",") if n]
    if hf:
        hf_section(args, hf)


def edge_section(args) -> None:
    import torch

    from edge_steer.bench.adapt import _call, _finetune_job
    from edge_steer.data import Dataset
    from edge_steer.models import DEFAULT_MODEL_DIR, load_model
    from edge_steer.sim.tasks import TASKS
    from edge_steer.steering.identify import IdentifyConfig, identify, probe_set

    out = Path(args.out)
    demos = _demos(args)
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    model = load_model(args.model)
    torch.set_num_threads(2)
    ds = Dataset(demos)
    others = sorted({t.instruction for t in TASKS.values()})
    ps = probe_set(model, ds, args.frames, 0, others)
    t0 = time.perf_counter()
    doc = identify(model, ps, IdentifyConfig(top_k=args.top_k, exact=True), progress=lambda m: print(" ", m))
    wall = time.perf_counter() - t0
    t = doc["timing"]
    (out / "heads.json").write_text(json.dumps(doc, indent=1))

    results = {}
    arms = [("steer", "steer", ())] + [(f"steer+{m}", "steer", (m,)) for m in args.whole.split(",") if m] \
        + [("lora", "lora", ()), ("full", "full", ())]
    for name, method, whole in arms:
        print(f"fine-tuning: {name}")
        r = _call(_finetune_job, {
            "model": str(model_dir), "demos": str(demos), "shots": args.shots, "method": method, "seed": 0,
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "top_k": args.top_k,
            "selection": "attribution", "slices": "qo", "whole": whole, "lora_rank": 16, "threads": 2,
            "isolate": True, "out": str(out / name)}, True)
        hist = json.loads((out / name / "finetune.json").read_text())["history"]
        results[name] = {**r, "history": hist}
    # a loss every method reaches: the worst of their final losses (x1.05)
    target = 1.05 * max(min(h["loss"] for h in r["history"]) for r in results.values())
    for r in results.values():
        hit = next((h for h in r["history"] if h["loss"] <= target), None)
        r["time_to_target_s"] = hit["elapsed_s"] if hit else float("nan")
        r["step_ms"] = 1000 * r["finetune_s"] / args.steps

    agree = doc["agreement"]
    lines = [
        "## Steering core (issue 4)", "",
        f"Command: `.venv/bin/python tools/bench_steering.py {' '.join(sys.argv[1:])}` at commit `{git_commit()}`, "
        f"{this_machine()}. Model `{model_dir.name}` (`{doc['model_fingerprint'][:12]}`, {doc['n_layers']} layers x "
        f"{doc['n_heads']} heads), "
        f"{args.shots} demos of `{args.task}`, {doc['demos']['frames']} probe frames.", "",
        "### Identification", "",
        "| estimate | wall s | forward passes (backward = 2) |", "|---|---|---|",
        f"| attribution patching (all heads, all factors) | {t['attribution_s']:.1f} | {t['attribution_passes']:.0f} |",
        f"| exact, cached trunk + one batched forward per layer | {t['exact_s']:.1f} | {t['exact_passes']:.1f} |",
        f"| exhaustive (one forward per head and replacement) | - | {t['exhaustive_passes']:.0f} |", "",
        f"Attribution needs **{t['exhaustive_passes'] / t['attribution_passes']:.1f}x** fewer passes than exhaustive "
        f"patching and ran {t['exact_s'] / max(t['attribution_s'], 1e-9):.1f}x faster than the exact scores. "
        f"Total identify wall time {wall:.1f} s.", "",
        "| attribution vs exact | Spearman rho | top-k overlap |", "|---|---|---|",
    ]
    for name, a in agree.items():
        lines.append(f"| {name} | {a['spearman']:.2f} | {a['topk_overlap']:.2f} (k={a['k']}) |")
    sel = ", ".join(f"{s['head']} ({'/'.join(s['factors']) or '-'})" for s in doc["selected"])
    lines += ["", f"Selected heads (attribution ranking): {sel}.", "",
              "### Fine-tuning, same data / steps / batch / lr", "",
              f"{args.steps} steps, batch {args.batch_size}, lr {args.lr}; LoRA rank 16 / alpha 32 on q, k, v, o; "
              f"steer = top-{args.top_k} heads, q rows + o columns; steer+M also trains module M whole. Target loss for 'time to reach' = {target:.3f} "
              "(the worst method's best logged loss x1.05).", "",
              "| method | trainable params | vs LoRA | step ms | peak RSS MB | final loss | s to target loss |",
              "|---|---|---|---|---|---|---|"]
    lora_p = results["lora"]["trainable_params"]
    for m, r in results.items():
        lines.append(f"| {m} | {r['trainable_params']:,} | {r['trainable_params'] / lora_p:.2f}x | {r['step_ms']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['final_loss']:.4f} | {r['time_to_target_s']:.1f} |")
    lo = results["lora"]
    lines.append("")
    for name in (n for n in results if n.startswith("steer")):
        s = results[name]
        lines.append(f"{name} / LoRA: trainable parameters {s['trainable_params'] / lora_p:.2f}x (goal <= 0.5x), "
                     f"step time {s['step_ms'] / lo['step_ms']:.2f}x (goal <= 1x).")
    text = "\n".join(lines) + "\n"
    print(text)
    upsert_section(args.docs, text)
    (out / "bench_steering.json").write_text(json.dumps({"identify": {"timing": t, "agreement": agree, "wall_s": wall},
                                                         "finetune": results}, indent=1, default=float))


def _demos(args) -> Path:
    from edge_steer.sim.demos import generate_demos
    from edge_steer.sim.env import EnvConfig
    demos = Path(args.out) / f"demos_{args.task}_{args.shots}"
    if not (demos / "meta" / "info.json").exists():
        print(f"recording {args.shots} demos of {args.task}")
        generate_demos(args.task, args.shots, 10_000, demos, EnvConfig())
    return demos


def _status_mb(key: str) -> float:
    """A field of /proc/self/status (VmRSS: resident now, VmHWM: its peak) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak_rss() -> float:
    """Restart the peak-RSS count from the resident set now (Linux: clear_refs 5), which it returns in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _hf_job(a: dict) -> dict:
    """One fine-tune of a saved HFVLA in a fresh process: its own time and memory, nothing else's."""
    import torch

    from edge_steer.data import Dataset, EpisodeFilter
    from edge_steer.models import load_model
    from edge_steer.steering.finetune import FinetuneConfig, finetune, with_train
    from edge_steer.steering.identify import selected_heads

    torch.set_num_threads(a["threads"])
    model = load_model(a["model"])
    loaded_mb = _reset_peak_rss()   # loading peaks above training (weights read, then copied in): not the fit's
    ds = Dataset(a["demos"], EpisodeFilter(limit=a["shots"]))
    doc = json.loads(Path(a["heads"]).read_text()) if a["method"] == "steer" else None
    cfg = with_train(FinetuneConfig(method=a["method"], lora_rank=16), steps=a["steps"], batch_size=a["batch"],
                     lr=a["lr"], warmup=2, checkpoint_every=10**9, log_every=max(1, a["steps"] // 4))
    res = finetune(model, ds, cfg, a["out"], heads=selected_heads(doc, model) if doc else None, heads_doc=doc,
                   progress=False)
    return {"trainable_params": res.trainable_params, "step_ms": 1000 * res.train.seconds / a["steps"],
            "peak_rss_mb": _status_mb("VmHWM"), "loaded_rss_mb": loaded_mb,
            "final_loss": res.train.final_loss}


def hf_section(args, names: list[str]) -> None:
    """Identification and steer / LoRA / full fine-tunes on each named HFVLA, ratios side by side."""
    import torch

    from edge_steer.bench.adapt import _call
    from edge_steer.data import Dataset, EpisodeFilter
    from edge_steer.models import load_model
    from edge_steer.models.configuration_hfvla import DEFAULT_LAYERS, DEFAULT_VISION, backbone_tower, vision_tower
    from edge_steer.models.modeling_hfvla import HFVLA
    from edge_steer.sim.tasks import TASKS
    from edge_steer.steering.identify import IdentifyConfig, identify, probe_set

    demos = _demos(args)
    torch.set_num_threads(2)
    lines = ["## Steering transformers VLAs (issue 45)", "",
             f"Command: `.venv/bin/python tools/bench_steering.py {' '.join(sys.argv[1:])}` at commit `{git_commit()}`, "
             f"{this_machine()}. {args.shots} demos of `{args.task}`; {args.hf_frames} probe frames; fine-tunes at batch "
             f"{args.hf_batch}, {args.hf_steps} steps, lr {args.lr}, each in a fresh process (peak RSS of that process "
             "while it fine-tunes: the count restarts once the model is loaded, whose load peaks higher; 'over load' = "
             "that peak minus the RSS right after loading the model). Steer = the top-"
             f"{args.top_k} heads by attribution, q rows + o columns; LoRA rank 16 / alpha 32 on every q, k, v, o "
             "projection of the backbone.", ""]
    record = {}
    for name in names:
        torch.manual_seed(0)
        ds = Dataset(demos, EpisodeFilter(limit=args.shots))
        if Path(name, "config.json").is_file():       # a trained checkpoint (e.g. pretrain --backbone minilm)
            model = load_model(name)
        else:                                          # a named configuration; random weights where not pretrained
            vision = DEFAULT_VISION.get(name) or ("tiny-siglip" if name.startswith("tiny") else "siglip-small")
            model = HFVLA.create(backbone_tower(name), vision_tower(vision), DEFAULT_LAYERS.get(name))
            model.set_stats(ds.stats)
        name = Path(name).name if Path(name).is_dir() else name
        model_dir = model.save_pretrained(Path(args.out) / f"hf_{name}" / "model")
        n_params = sum(p.numel() for p in model.parameters())
        ps = probe_set(model, ds, args.hf_frames, 0, sorted({t.instruction for t in TASKS.values()}))
        t0 = time.perf_counter()
        doc = identify(model, ps, IdentifyConfig(top_k=args.top_k, exact=True, batch_size=8),
                       progress=lambda m, n=name: print(f"  {n}: {m}"))
        wall = time.perf_counter() - t0
        heads_file = Path(args.out) / f"hf_{name}" / "heads.json"
        heads_file.write_text(json.dumps(doc, indent=1))
        del model
        t, agree = doc["timing"], doc["agreement"]["ablation"]
        runs = {}
        for method in ("steer", "lora", "full"):
            print(f"  {name}: fine-tuning {method}")
            runs[method] = _call(_hf_job, {"model": str(model_dir), "demos": str(demos), "shots": args.shots,
                                           "method": method, "heads": str(heads_file), "steps": args.hf_steps,
                                           "batch": args.hf_batch, "lr": args.lr, "threads": 2,
                                           "out": str(Path(args.out) / f"hf_{name}" / method)}, True)
        st, lo, fu = runs["steer"], runs["lora"], runs["full"]
        lines += [f"### `{name}`: {doc['n_layers']} backbone layers x {doc['n_heads']} heads "
                  f"({doc['n_kv_heads']} kv), {n_params / 1e6:.1f} M parameters", "",
                  "| identification | wall s | forward passes (backward = 2) |", "|---|---|---|",
                  f"| attribution (all heads, all factors) | {t['attribution_s']:.1f} | {t['attribution_passes']:.0f} |",
                  f"| exact, batched per layer | {t['exact_s']:.1f} | {t['exact_passes']:.1f} |",
                  f"| exhaustive | - | {t['exhaustive_passes']:.0f} |", "",
                  f"Attribution vs exact mean ablation: top-{agree['k']} overlap **{agree['topk_overlap']:.2f}** "
                  f"(goal >= 0.8), Spearman {agree['spearman']:.2f}, with **{t['exhaustive_passes'] / t['attribution_passes']:.1f}x** "
                  f"fewer passes than exhaustive (goal >= 20x); identify wall time {wall:.1f} s.", "",
                  "| method | trainable params | vs LoRA | step ms | vs LoRA | peak RSS MB | over load MB |",
                  "|---|---|---|---|---|---|---|"]
        for m, r in runs.items():
            lines.append(f"| {m} | {r['trainable_params']:,} | {r['trainable_params'] / lo['trainable_params']:.2f}x | "
                         f"{r['step_ms']:.0f} | {r['step_ms'] / lo['step_ms']:.2f}x | {r['peak_rss_mb']:.0f} | "
                         f"{r['peak_rss_mb'] - r['loaded_rss_mb']:.0f} |")
        lines += ["", f"Steer / LoRA r16: trainable parameters {st['trainable_params'] / lo['trainable_params']:.2f}x "
                  f"(goal <= 0.5), step time {st['step_ms'] / lo['step_ms']:.2f}x (goal <= 1.0); peak memory over "
                  f"load steer / LoRA / full = {st['peak_rss_mb'] - st['loaded_rss_mb']:.0f} / "
                  f"{lo['peak_rss_mb'] - lo['loaded_rss_mb']:.0f} / {fu['peak_rss_mb'] - fu['loaded_rss_mb']:.0f} MB.", ""]
        record[name] = {"identify": {"timing": t, "agreement": doc["agreement"], "wall_s": wall}, "finetune": runs}
    text = "\n".join(lines) + "\n"
    print(text)
    upsert_section(args.docs, text)
    (Path(args.out) / "bench_steering_hf.json").write_text(json.dumps(record, indent=1, default=float))


if __name__ == "__main__":
    main()
