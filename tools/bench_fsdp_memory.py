"""Memory of full fine-tuning per process: alone, or sharded with FSDP under torchrun.

    python tools/bench_fsdp_memory.py --demos DIR [--model CKPT]                        # one process
    torchrun --standalone --nproc-per-node 2 tools/bench_fsdp_memory.py --demos DIR     # two, sharded

Trains every weight for --steps steps through the training loop's own wrapping (distributed.for_training) and
prints, per process, the bytes it holds of the parameters, their gradients and the AdamW state after a step,
and its peak resident memory (which includes the imported libraries, the base model the caller loaded and the
transient full weights of the block that runs).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_steer.data import Dataset  # noqa: E402
from edge_steer.models import load_model  # noqa: E402
from edge_steer.models.distributed import data_parallel, for_training  # noqa: E402
from edge_steer.models.train import batches  # noqa: E402


def local_bytes(tensors) -> tuple[int, int]:
    """Bytes of `tensors` this process holds (a sharded tensor's own shard only), and of the distinct storages
    they live in (a framework's flat buffers can hold more than the tensors viewing them)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors if t is not None]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in local}
    return sum(t.numel() * t.element_size() for t in local), sum(storages.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demos", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=None, help="base checkpoint (default: the embedded model)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    a = ap.parse_args()
    ddp = data_parallel()
    model = load_model(a.model)
    n_params = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(True)
    run = for_training(model, list(model.parameters()), ddp)
    opt = torch.optim.AdamW(run.params, lr=1e-4)
    data = batches(Dataset(a.demos), a.batch_size, model.config.chunk, 0)
    for _ in range(a.steps):
        batch = next(data)
        if ddp is not None:
            batch = ddp.shard(batch)
        opt.zero_grad(set_to_none=True)
        run.loss(batch).backward()
        opt.step()
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
    row = {"processes": 1 if ddp is None else ddp.world, "rank": 0 if ddp is None else ddp.rank,
           "parameters": n_params,
           "param_bytes": local_bytes(run.params), "grad_bytes": local_bytes([p.grad for p in run.params]),
           "adam_bytes": local_bytes(state), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
    print(json.dumps(row), flush=True)
    run.finish()


if __name__ == "__main__":
    main()
