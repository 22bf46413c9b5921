"""Turn a training checkpoint (`RUN/checkpoints/step_*.pt`) into a model directory that `edge-steer eval`
can load, to look at a pretraining run before it finishes.

Usage: .venv/bin/python tools/checkpoint_model.py --run runs/pretrain7 --like runs/pretrain6/model --out runs/p7_2000
`--like`: a model directory with the same architecture (the `--init` model of the run); its config is
kept, every weight and normalisation buffer comes from the checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from edge_steer.models import EdgeVLA
from edge_steer.models.train import checkpoint_path, checkpoint_paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--like", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    args = ap.parse_args()
    if args.step is None:
        latest = checkpoint_paths(args.run)
        if not latest:
            raise SystemExit(f"no checkpoint in {args.run}")
        path = latest[-1]
    else:
        path = checkpoint_path(args.run, args.step)
        if not path.is_file():
            raise SystemExit(f"no checkpoint {path}")
    model = EdgeVLA.from_pretrained(args.like)
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    model.save_pretrained(args.out)
    print(f"{path} (step {state['step']}) -> {args.out}")


if __name__ == "__main__":
    main()
