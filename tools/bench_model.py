"""Reference-VLA figures: parameters, FLOPs per forward, batch-1 latency, training throughput,
and the closed-loop success table (base vs held-out) from eval logs.

Usage: .venv/bin/python tools/bench_model.py [--model DIR] [--base-eval runs/pretrain/eval.json]
                                             [--heldout-eval runs/heldout_eval.json] [--out docs/model.md]
       .venv/bin/python tools/bench_model.py --trunks 'd_model=192,n_heads=12;n_layers=6'   (what a bigger trunk
           costs a training step against the model's own, measured side by side; a section of its own)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _report import git_commit, this_machine, upsert_section
from torch.utils.flop_counter import FlopCounterMode

from edge_steer.models import DEFAULT_MODEL_DIR, load_model
from edge_steer.models.train import cpu_has_bf16


def fake_batch(model, b: int) -> dict:
    c = model.config
    rng = np.random.default_rng(0)
    x = {f"observation.images.{cam}": rng.integers(0, 256, (b, c.image_size, c.image_size, 3), dtype=np.uint8)
         for cam in c.cameras}
    x["observation.state"] = rng.normal(size=(b, c.state_dim)).astype(np.float32)
    x["action"] = rng.normal(size=(b, c.chunk, c.action_dim)).astype(np.float32)
    x["action_is_pad"] = np.zeros((b, c.chunk), bool)
    x["task"] = ["put the red cube on the blue plate"] * b
    return x


def stock_kernels(model):
    """A copy of `model` whose patch convs are plain nn.Conv2d and whose attention trains through
    PyTorch's fused kernel: the baseline for the training-speed figure."""
    import copy

    from torch import nn

    from edge_steer.models.vla import PatchConv2d
    stock = copy.deepcopy(model)
    for mod in list(stock.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, PatchConv2d):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride)
                conv.load_state_dict(child.state_dict())
                setattr(mod, child_name, conv)
        if hasattr(mod, "fused_in_training"):
            mod.fused_in_training = True
    return stock


def forward_flops(model, inputs: dict) -> int:
    """FLOPs of one forward pass on `inputs` (already prepared)."""
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(**inputs)
    return fc.get_total_flops()


def train_step_s(model, batch: dict, steps: int = 8) -> list[float]:
    """Seconds of each training step after the first (bf16 autocast where the CPU has the units, as pretraining)."""
    opt, times, bf16 = torch.optim.AdamW(model.parameters(), 1e-4), [], cpu_has_bf16()
    model.train()
    for i in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return times


def parse_trunks(spec: str) -> list[dict[str, int]]:
    """'d_model=192,n_heads=12;n_layers=6' -> [{'d_model': 192, 'n_heads': 12}, {'n_layers': 6}]."""
    allowed = {"d_model", "n_layers", "n_heads", "head_dim", "n_kv_heads"}
    out = []
    for part in filter(None, spec.split(";")):
        d = {}
        for kv in part.split(","):
            k, _, v = kv.partition("=")
            if k.strip() not in allowed or not v.strip().isdigit():
                raise SystemExit(f"--trunks: {kv!r} is not one of {sorted(allowed)}=<int>")
            d[k.strip()] = int(v)
        out.append(d)
    return out


def trunk_costs(model, trunks: list[dict[str, int]], rounds: int = 3) -> str:
    """A section: each candidate trunk (randomly initialised, otherwise the model's config) against the model's
    own, parameters, FLOPs and training-step time, the step times measured in interleaved rounds."""
    from dataclasses import replace

    from edge_steer.models import EdgeVLA
    models = {"shipped": model}
    for t in trunks:   # as many kv heads as query heads unless the spec says (the shipped model has no GQA)
        models[", ".join(f"{k}={v}" for k, v in t.items())] = EdgeVLA(
            replace(model.config, **{"n_kv_heads": t.get("n_heads", model.config.n_heads), **t}))
    xb = fake_batch(model, 64)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):   # interleaved, so a slow spell of the machine lands on every model
        for name, m in models.items():
            times[name] += train_step_s(m, xb)
    ref = statistics.median(times["shipped"])
    lines = ["## Trunk sizes: what a wider or deeper model costs (issue 3)", "",
             f"Command: `.venv/bin/python tools/bench_model.py --trunks '{';'.join(','.join(f'{k}={v}' for k, v in t.items()) for t in trunks)}'`"
             f" at commit `{git_commit()}`, {this_machine()}, torch {torch.__version__}, batch 64, "
             f"{'bf16 autocast' if cpu_has_bf16() else 'fp32'}, median of {len(times['shipped'])} steps each "
             "(interleaved rounds); candidates randomly initialised.", "",
             "| trunk | layers x heads x dims, d_model | addressable heads | parameters | MFLOP per batch-1 forward "
             "| step (s) | x shipped |", "|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        c = m.config
        flops = forward_flops(m.eval(), m.prepare(fake_batch(m, 1)))
        step = statistics.median(times[name])
        lines.append(f"| {name} | {c.n_layers} x {c.n_heads} x {c.head_dim}, {c.d_model} | {c.n_layers * c.n_heads} "
                     f"| {sum(p.numel() for p in m.parameters()):,} | {flops / 1e6:.1f} | {step:.3f} "
                     f"| {step / ref:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--base-eval", default=None)
    ap.add_argument("--heldout-eval", default=None)
    ap.add_argument("--train-log", default=None, help="history.json of the pretraining run")
    ap.add_argument("--out", default="docs/model.md")
    ap.add_argument("--trunks", default=None, help="only price these trunks against the model's: "
                    "'d_model=192,n_heads=12;n_layers=6' (keys d_model, n_layers, n_heads, head_dim, n_kv_heads)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(args.model).eval()
    if args.trunks:
        text = trunk_costs(model, parse_trunks(args.trunks))
        print(text)
        upsert_section(args.out, text)
        return
    n_params = sum(p.numel() for p in model.parameters())
    x1 = fake_batch(model, 1)
    inputs = model.prepare(x1)
    flops = forward_flops(model, inputs)
    lat = []
    with torch.no_grad():
        for _ in range(10):
            model(**inputs)
        for _ in range(100):
            t0 = time.perf_counter()
            model(**model.prepare(x1))
            lat.append((time.perf_counter() - t0) * 1000)
    lat.sort()
    # training throughput, with the precision pretraining picks on this CPU: ours, and the same model on
    # PyTorch's stock kernels (nn.Conv2d patch embedding, fused attention backward), interleaved so both
    # see one machine
    bf16 = cpu_has_bf16()
    xb = fake_batch(model, 64)
    runs = {"ours": (model, []), "stock": (stock_kernels(model), [])}
    for _ in range(2):   # interleaved rounds, so both see one machine
        for m, times in runs.values():
            times += train_step_s(m, xb, steps=5)
    sps, stock_sps = (64 / statistics.median(runs[k][1]) for k in ("ours", "stock"))
    size_mb = sum(f.stat().st_size for f in Path(args.model).iterdir()) / 1e6
    c = model.config
    lines = ["## The reference VLA (issue 3)", "",
             f"Command: `.venv/bin/python tools/bench_model.py --model {args.model}"
             + (f" --base-eval {args.base_eval}" if args.base_eval else "")
             + (f" --heldout-eval {args.heldout_eval}" if args.heldout_eval else "")
             + (f" --train-log {args.train_log}" if args.train_log else "")
             + f"` at commit `{git_commit()}`, {this_machine()}, torch {torch.__version__}.", "",
             "| figure | value |", "|---|---|",
             f"| architecture | {c.n_layers} layers x {c.n_heads} heads (kv heads {c.n_kv_heads}) x {c.head_dim} dims, "
             f"d_model {c.d_model}, {len(c.cameras)} cameras at {c.image_size} px -> {c.patches_per_camera} patches each, "
             f"language `{c.language}`, chunk {c.chunk} |",
             f"| trainable parameters (MiniLM encoder frozen, not counted) | {n_params:,} |",
             f"| checkpoint size | {size_mb:.1f} MB |",
             f"| FLOPs per batch-1 forward | {flops / 1e6:.1f} MFLOP |",
             f"| batch-1 forward latency, fp32, p50 / p99 (ms, incl. preprocessing) | {lat[49]:.2f} / {lat[98]:.2f} |",
             f"| training throughput, batch 64, {'bf16 autocast' if bf16 else 'fp32 (no bf16 units)'} (samples/s) | {sps:.0f} |",
             f"| the same on PyTorch's stock kernels (nn.Conv2d patches, fused attention backward) | {stock_sps:.0f} "
             f"(ours {sps / stock_sps:.2f}x faster) |", ""]
    if args.train_log and Path(args.train_log).exists():
        hist = json.loads(Path(args.train_log).read_text())
        last = hist[-1]
        lines += [f"The checkpoint's last training run ({args.train_log}): {last['step']} steps in "
                  f"{last['elapsed_s'] / 60:.1f} min on this machine, final training loss {last['loss']:.4f} (L1 on "
                  "normalised actions, plus the scene loss where the config has one). A run started from an earlier "
                  "checkpoint (`--init`) is one link of a chain: the attempts above list every link.", ""]
    rows = []
    for path in (args.base_eval, args.heldout_eval):
        if path and Path(path).exists():
            rows += json.loads(Path(path).read_text())["summary"]
    if rows:
        lines += ["| task | split | factor | success | 95 % CI (Wilson) |", "|---|---|---|---|---|"]
        for r in rows:
            lo, hi = r["ci95"]
            lines.append(f"| {r['task']} | {r['split']} | {r['factor'] or '-'} | {r['successes']}/{r['episodes']} "
                         f"({100 * r['successes'] / r['episodes']:.0f} %) | {100 * lo:.0f}-{100 * hi:.0f} % |")
        for split in ("base", "heldout"):
            sel = [r for r in rows if r["split"] == split]
            if sel:
                k, n = sum(r["successes"] for r in sel), sum(r["episodes"] for r in sel)
                lines.append(f"| **all {split}** | | | {k}/{n} ({100 * k / n:.0f} %) | |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    upsert_section(args.out, text)


if __name__ == "__main__":
    main()
