"""The training loop: batches from the dataset, AdamW with warmup + cosine, bf16 autocast on CPUs with bf16 units,
progress bar, periodic atomic checkpoints and resume after an interruption.

It trains whatever parameters it is given: pretraining passes all of them, the steering room passes
only the slices it adapts.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_steer.files import atomic_path, atomic_write_text

CKPT_DIR = "checkpoints"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 3e-4
    min_lr_ratio: float = 0.05
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    seed: int = 0
    bf16: bool | None = None      # autocast to bfloat16; None: only where the CPU has bf16 units (cpu_has_bf16)
    deterministic: bool = False


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: where bf16 autocast speeds training up. Without them PyTorch emulates bf16,
    and a training step of the default model took 12.8 s instead of 1.4 s in fp32 (AMD EPYC, AVX2 only;
    docs/model.md)."""
    cpu = torch.cpu
    return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def batches(dataset, batch_size: int, chunk: int, seed: int, start_step: int = 0) -> Iterator[dict]:
    """Endless batches; batch k depends only on (seed, k), so a run resumed at step k continues
    exactly as the uninterrupted run would have."""
    n = len(dataset)
    step = start_step
    while True:
        idx = np.random.default_rng([seed, step]).integers(0, n, batch_size)
        yield dataset.sample(idx, chunk=chunk)
        step += 1


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    samples_per_s: float
    history: list[dict]
    bf16: bool = False            # whether the run autocast to bfloat16


def fit(model: nn.Module, params: Sequence[nn.Parameter], make_batches: Callable[[int], Iterator[dict]],
        cfg: TrainConfig,
        out_dir: str | Path, loss_fn: Callable[[dict], torch.Tensor] | None = None,
        resume: bool = True, progress: bool = True) -> TrainResult:
    """Optimise `params` of `model` for cfg.steps steps; checkpoints go to out_dir.

    `make_batches(start_step)` returns the batch stream; a resumed run passes the step it resumes
    from, so it does not replay the batches it already trained on."""
    from edge_steer.models.distributed import data_parallel, for_training
    ddp = data_parallel(next(model.parameters()).device)   # under torchrun: this process's share of each batch
    progress = progress and (ddp is None or ddp.main)
    out = Path(out_dir)
    (out / CKPT_DIR).mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed, cfg.deterministic)
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters")
    step, history, saved_optim = _restore(out, model) if resume else (0, [], None)
    model.train()            # before wrapping: a sharded run trains a twin made from the model as it is now
    run = for_training(model, params, ddp, loss_fn)   # DDP for some parameters, FSDP for all, or the model as is
    opt = torch.optim.AdamW(run.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if saved_optim is not None:
        run.load_optimizer(opt, saved_optim)
    data = make_batches(step)
    bf16 = cpu_has_bf16() if cfg.bf16 is None else cfg.bf16
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    t0, done_before = time.perf_counter(), step
    losses: list[float] = []
    bar = _bar(progress, cfg.steps, step)
    try:
        while step < cfg.steps:
            batch, scale = next(data), 1.0
            if ddp is not None:
                shard = ddp.shard(batch)
                batch, scale = shard, ddp.loss_scale(shard, batch)
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            with amp:
                loss = run.loss(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            (loss * scale).backward()    # DDP / FSDP average the processes' gradients: scaled, the whole batch's
            torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
            opt.step()
            step += 1
            losses.append(loss.item() if ddp is None else ddp.mean(loss.item(), scale))
            if step % cfg.log_every == 0 or step == cfg.steps:
                history.append({"step": step, "loss": float(np.mean(losses)), "lr": lr_at(cfg, step - 1),
                                "elapsed_s": time.perf_counter() - t0})
                losses = []
                if progress and not sys.stdout.isatty():  # a bar does not render into a log file
                    h = history[-1]
                    print(f"step {step}/{cfg.steps} loss {h['loss']:.4f} lr {h['lr']:.2e} "
                          f"{h['elapsed_s']:.0f} s", flush=True)
            if bar:
                bar[0].update(bar[1], advance=1, description=f"train loss {loss.item():.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                model_state, optim_state = run.state(opt)   # sharded: gathered on process 0
                if ddp is None or ddp.main:
                    _checkpoint(out, model_state, optim_state, step, history, cfg)
    finally:
        if bar:
            bar[0].stop()
    run.finish()
    dt = time.perf_counter() - t0
    n = step - done_before
    return TrainResult(step, history[-1]["loss"] if history else float("nan"), dt,
                       n * cfg.batch_size / dt if dt > 0 else 0.0, history, bf16)


def _bar(progress: bool, total: int, completed: int):
    if not progress or not sys.stdout.isatty():
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    p.start()
    return p, p.add_task("train", total=total, completed=completed)


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:07d}.pt"


def checkpoint_paths(run_dir: str | Path) -> list[Path]:
    """A run's checkpoints, oldest first."""
    return sorted((Path(run_dir) / CKPT_DIR).glob("step_*.pt"))


def _checkpoint(out: Path, model_state: dict, optim_state: dict, step: int, history: list, cfg: TrainConfig) -> None:
    path = checkpoint_path(out, step)
    with atomic_path(path) as tmp:   # a checkpoint is either complete or absent
        torch.save({"step": step, "model": model_state, "optim": optim_state, "history": history,
                    "train_config": asdict(cfg), "torch_rng": torch.get_rng_state()}, tmp)
    for old in checkpoint_paths(out)[:-cfg.keep_checkpoints]:
        old.unlink()
    atomic_write_text(out / "history.json", json.dumps(history))


def _restore(out: Path, model: nn.Module) -> tuple[int, list, dict | None]:
    """The last checkpoint's weights into `model`; its step, history and optimiser state."""
    ckpts = checkpoint_paths(out)
    if not ckpts:
        return 0, [], None
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), list(state["history"]), state["optim"]
