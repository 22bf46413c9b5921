"""Benchmark edge_steer.data: episode write speed, dataset open time, chunk-sampling throughput.

    .venv/bin/python tools/bench_data.py [--episodes 20] [--length 100] [--batch 64] [--chunk 10] [--out docs/benchmarks.md]

Frames are the project's default spec (two 96x96 cameras, state, joints, 7-D action) filled with
smooth synthetic images (noise would make PNGs unrealistically large and slow to decode).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from _report import git_commit, upsert_section

from edge_steer.data import ChunkSampler, Dataset, DatasetWriter, default_spec


def frame(rng: np.random.Generator, t: int, size: int) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([(xx + t) % 256, (yy * 2) % 256, (xx + yy + 3 * t) % 256], axis=-1).astype(np.uint8)
    return {"observation.images.front": img, "observation.images.wrist": img[::-1].copy(),
            "observation.state": rng.normal(size=8).astype(np.float32),
            "observation.joints": rng.normal(size=7).astype(np.float32),
            "action": rng.normal(size=7).astype(np.float32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--length", type=int, default=100)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=3.0, help="how long to time warm sampling")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bench"
        t0 = time.perf_counter()
        with DatasetWriter(root, default_spec(image_size=args.size)) as w:
            for _ in range(args.episodes):
                w.begin_episode()
                for t in range(args.length):
                    w.add_frame(frame(rng, t, args.size), task="put the red cube on the plate")
                w.end_episode(success=True)
        n = args.episodes * args.length
        dt = time.perf_counter() - t0
        write_fps = n / dt
        print(f"write: {n} frames in {dt:.2f} s ({write_fps:.0f} frames/s, incl. PNG encoding and stats)")

        t0 = time.perf_counter()
        ds = Dataset(root)
        open_s = time.perf_counter() - t0
        print(f"open: {open_s:.3f} s for {len(ds)} frames")

        sampler = ChunkSampler(ds, batch_size=args.batch, chunk=args.chunk, seed=0)
        t0 = time.perf_counter()
        for _ in sampler:  # first epoch decodes every PNG once
            pass
        dt = time.perf_counter() - t0
        cold = len(ds) / dt
        print(f"first epoch (cold, decoding): {cold:.0f} samples/s")

        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            for batch in sampler:
                count += len(batch["action"])
        dt = time.perf_counter() - t0
        warm = count / dt
        print(f"warm sampling: {warm:.0f} samples/s (batch {args.batch}, chunk {args.chunk}, "
              f"2 cameras {args.size}x{args.size}); action {batch['action'].shape}")
    upsert_section(args.out, "\n".join([
        "## Dataset I/O (issue 2)", "",
        f"Command: `.venv/bin/python tools/bench_data.py --episodes {args.episodes} --length {args.length}` at commit "
        f"`{git_commit()}`; synthetic frames, two {args.size}x{args.size} cameras.", "",
        "| figure | value |", "|---|---|",
        f"| episode writing incl. PNG encoding + stats (frames/s) | {write_fps:,.0f} |",
        f"| opening a {n}-frame dataset (s) | {open_s:.3f} |",
        f"| chunk sampling, first epoch while decoding PNGs (samples/s) | {cold:,.0f} |",
        f"| chunk sampling, warm, batch {args.batch}, chunk {args.chunk} (samples/s) | {warm:,.0f} |",
        "", "Training consumes far fewer samples/s than this (docs/model.md): training is not input-bound.", ""]))


if __name__ == "__main__":
    main()
