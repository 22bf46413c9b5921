"""Data-parallel training across processes started by `torchrun --nproc-per-node N` (one process, the default,
needs none of this).

Every process builds the same model and draws the same global batch (batch k depends only on (seed, k)) and
trains on its own contiguous 1/N of the rows. How the processes combine their work depends on what trains:

* steer / LoRA (a few trainable tensors in a frozen model): DistributedDataParallel over a module whose forward
  is the model's `loss` (DDP hooks into forward), which all-reduces the gradients of the parameters that require
  grad only (the head slices' values, the adapters); the frozen weights are never communicated.
* full fine-tuning (every weight trains): FSDP2 `fully_shard`, each transformer block one unit, so a process
  holds 1/N of the weights, gradients and optimiser state between a unit's use (the unit's full weights exist
  only while it runs); checkpoints gather the whole model and optimiser state on process 0.

Both average the processes' gradients. A shard's loss is a mean over its valid action steps (`loss_weight`), and
shards of one batch can hold different numbers of padded steps, so each process scales its loss by
N * (its weight) / (the batch's weight) before backward: the average is then the whole batch's gradient, and N
processes take the steps one process takes on the whole batch, up to float summation order. Every process
holds the whole global batch, so the batch's weight needs no communication.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn


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

    def loss_scale(self, shard: dict[str, Any], batch: dict[str, Any]) -> float:
        """What this shard's mean loss is multiplied by so that the frameworks' mean of the processes' gradients
        is the gradient of the whole batch's mean loss."""
        return self.world * loss_weight(shard) / loss_weight(batch)

    def mean(self, value: float, scale: float) -> float:
        """The whole batch's mean loss from the shards' (for the log): the mean of the scaled losses."""
        import torch.distributed as dist
        t = torch.tensor([value * scale], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0]) / self.world


def loss_weight(batch: dict[str, Any]) -> float:
    """What a shard's mean loss is a mean over: its valid (unpadded) action steps where the batch marks padding
    (the training losses average over those, `masked_l1`), else its rows. Shards of one batch can hold different
    numbers of padded steps, so an unweighted mean of their losses would not be the batch's."""
    pad = batch.get("action_is_pad")
    if pad is not None:
        return float((~np.asarray(pad, dtype=bool)).sum())
    return float(len(next(v for v in batch.values() if isinstance(v, (np.ndarray, torch.Tensor, list)))))


class _Loss(nn.Module):
    """The model's loss as a forward, where DDP and FSDP hook in."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[dict], torch.Tensor] | None = None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict) -> torch.Tensor:
        return (self.loss_fn or self.model.loss)(batch)


class Local:
    """One process: the model as it is."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], loss_fn=None):
        self.model, self.params, self.loss = model, params, loss_fn or model.loss

    def state(self, opt) -> tuple[dict, dict]:
        """The model's and optimiser's whole state dicts (a collective where sharded: every process calls it)."""
        return self.model.state_dict(), opt.state_dict()

    def load_optimizer(self, opt, state: dict) -> None:
        opt.load_state_dict(state)

    def finish(self) -> None:
        """Leave the trained weights in the plain model (a collective where sharded)."""


class Replicated(Local):
    """steer / LoRA: every process holds the model; DDP averages the trainable parameters' gradients."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], loss_fn=None):
        from torch.nn.parallel import DistributedDataParallel
        super().__init__(model, params, loss_fn)
        # only parameters that require grad are reduced; every process loaded the same weights: no initial sync
        self.loss = DistributedDataParallel(_Loss(model, loss_fn), forward_sync_buffers=False, init_sync=False)


class Sharded(Local):
    """Full fine-tuning: FSDP2 over a twin of the model that shares its tensors (so the plain model can take the
    trained weights back at the end); the plain model's own weights are released while the shards train."""

    PREFIX = "model."

    def __init__(self, model: nn.Module, params: list[nn.Parameter], loss_fn=None):
        from torch.distributed.fsdp import fully_shard
        if loss_fn is not None:
            raise ValueError("full fine-tuning across processes trains the model's own loss, not a custom one")
        memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        self.wrapped = _Loss(copy.deepcopy(model, memo))   # the structure copied, the tensors shared
        for m in reversed(list(self.wrapped.modules())):   # inner units before the ones holding them
            if isinstance(m, nn.ModuleList):                    # transformer blocks: one unit each
                for block in m:
                    fully_shard(block)
        fully_shard(self.wrapped)
        for p in model.parameters():                        # the shards now hold the weights
            p.data = torch.empty(0, dtype=p.dtype)
        super().__init__(model, [p for p in self.wrapped.parameters() if p.requires_grad])
        self.loss = self.wrapped

    def _names(self) -> list[str]:
        return [n for n, p in self.wrapped.named_parameters() if p.requires_grad]

    def state(self, opt) -> tuple[dict, dict]:
        """Whole state dicts gathered on process 0 (empty elsewhere), in a single process's layout."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        o = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = {k[len(self.PREFIX):]: v for k, v in get_model_state_dict(self.wrapped, options=o).items()}
        optim = get_optimizer_state_dict(self.wrapped, opt, options=o)
        if not optim:
            return model, optim
        index = {n: i for i, n in enumerate(self._names())}   # parameter names -> positions, as opt.state_dict()
        return model, {"state": {index[n]: s for n, s in optim["state"].items()},
                       "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                        for g in optim["param_groups"]]}

    def load_optimizer(self, opt, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        names = self._names()
        full = {"state": {names[i]: s for i, s in state["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(self.wrapped, opt, full, options=StateDictOptions(full_state_dict=True))

    def finish(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True))
        for name, p in self.model.named_parameters():   # (the buffers were shared all along)
            p.data = full[self.PREFIX + name].detach()


def for_training(model: nn.Module, params: list[nn.Parameter], ddp: DataParallel | None,
                 loss_fn: Callable[[dict], torch.Tensor] | None = None) -> Local:
    """How this process trains `params` of `model`: alone, replicated (some parameters train) or sharded
    (every parameter trains)."""
    if ddp is None:
        return Local(model, params, loss_fn)
    if {id(p) for p in params} == {id(p) for p in model.parameters()}:
        return Sharded(model, params, loss_fn)
    return Replicated(model, params, loss_fn)


def data_parallel(device: torch.device | str = "cpu") -> DataParallel | None:
    """This process's place when torchrun started several (WORLD_SIZE > 1), joining their process group on
    first use with the backend for where the model's tensors are (nccl for CUDA tensors, gloo otherwise: a
    CPU model on a machine that has a GPU still needs gloo); None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return DataParallel(dist.get_rank(), dist.get_world_size())


def is_main() -> bool:
    """Whether this is the process that writes results (always, without torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0
