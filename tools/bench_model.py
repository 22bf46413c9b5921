"""Reference-VLA figures: parameters, FLOPs per forward, batch-1 latency, training throughput,
and the closed-loop success table (base vs held-out) from eval logs.

Usage: .venv/bin/python tools/bench_model.py [--model DIR] [--base-eval runs/pretrain/eval.json]
                                             [--heldout-eval runs/heldout_eval.json] [--out docs/model.md]
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
from _report import git_commit, upsert_section
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--base-eval", default=None)
    ap.add_argument("--heldout-eval", default=None)
    ap.add_argument("--train-log", default=None, help="history.json of the pretraining run")
    ap.add_argument("--out", default="docs/model.md")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(args.model).eval()
    n_params = sum(p.numel() for p in model.parameters())
    x1 = fake_batch(model, 1)
    inputs = model.prepare(x1)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(**inputs)
    flops = fc.get_total_flops()
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
    runs = {k: (m.train(), torch.optim.AdamW(m.parameters(), 1e-4), [])
            for k, m in (("ours", model), ("stock", stock_kernels(model)))}
    for i in range(8):
        for m, opt, times in runs.values():
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = m.loss(xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - t0)
    sps, stock_sps = (64 / statistics.median(runs[k][2]) for k in ("ours", "stock"))
    size_mb = sum(f.stat().st_size for f in Path(args.model).iterdir()) / 1e6
    c = model.config
    lines = ["## The reference VLA (issue 3)", "",
             f"Command: `.venv/bin/python tools/bench_model.py --model {args.model}"
             + (f" --base-eval {args.base_eval}" if args.base_eval else "")
             + (f" --heldout-eval {args.heldout_eval}" if args.heldout_eval else "")
             + (f" --train-log {args.train_log}" if args.train_log else "")
             + f"` at commit `{git_commit()}`, {os.cpu_count()} CPU cores, torch {torch.__version__}.", "",
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
