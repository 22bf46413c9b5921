"""Data-parallel training across processes started by `torchrun --nproc-per-node N` (one process, the default,
needs none of this).

Every process builds the same model and draws the same global batch (batch k depends only on (seed, k));
each trains on its own 1/N of the rows, and the gradients of the trainable parameters only (a steer run's
head slices, a LoRA run's adapters; every weight in full fine-tuning) are averaged across the processes in
one flat all-reduce before clipping and the optimiser step. The mean of N equal shards' mean losses is the
global batch's mean loss, so N processes take the same steps as one process on the whole batch, up to float
summation order. This is what DistributedDataParallel does, done by hand because `fit` calls the model's
`loss`, not its `forward`, which is where DDP hooks its reduction. Full fine-tuning is replicated, not
sharded (no FSDP yet): each process holds the whole model and optimiser state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class DataParallel:
    rank: int
    world: int

    @property
    def main(self) -> bool:
        """The process that writes checkpoints, logs and results."""
        return self.rank == 0

    def shard(self, batch: dict[str, Any]) -> dict[str, Any]:
        """This process's contiguous 1/world of every row-indexed value of the global batch."""
        def part(v):
            n = len(v)
            if n % self.world:
                raise ValueError(f"a batch of {n} rows does not split over {self.world} processes: "
                                 "make --batch-size a multiple of the process count")
            k = n // self.world
            return v[self.rank * k:(self.rank + 1) * k]
        return {key: part(v) if isinstance(v, (np.ndarray, torch.Tensor, list)) else v for key, v in batch.items()}

    def average_gradients(self, params: list[torch.nn.Parameter], weight: float) -> None:
        """The trainable parameters' gradients as the whole batch's loss would give them, in one all-reduce:
        each process's weighted by its share of the loss's denominator (`loss_weight` of its shard)."""
        import torch.distributed as dist
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) * weight for g in grads] + [torch.tensor([float(weight)], dtype=grads[0].dtype)])
        dist.all_reduce(flat)
        flat = flat[:-1] / flat[-1]
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean(self, value: float, weight: float) -> float:
        """A shard's mean loss made the whole batch's (for the log)."""
        import torch.distributed as dist
        t = torch.tensor([value * weight, weight], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0] / t[1])


def loss_weight(batch: dict[str, Any]) -> float:
    """What a shard's mean loss is a mean over: its valid (unpadded) action steps where the batch marks padding
    (the training losses average over those, `masked_l1`), else its rows. Shards of one batch can hold different
    numbers of padded steps, so an unweighted mean of their losses would not be the batch's."""
    pad = batch.get("action_is_pad")
    if pad is not None:
        return float((~np.asarray(pad, dtype=bool)).sum())
    return float(len(next(v for v in batch.values() if isinstance(v, (np.ndarray, torch.Tensor, list)))))


def data_parallel() -> DataParallel | None:
    """This process's place when torchrun started several (WORLD_SIZE > 1), joining their process group
    (gloo on CPU, nccl on CUDA) on first use; None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DataParallel(dist.get_rank(), dist.get_world_size())


def is_main() -> bool:
    """Whether this is the process that writes results (always, without torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0
