"""Small synthetic demos and tiny models for the steering tests (no sim, seconds to build)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_steer.data import Dataset, DatasetWriter, EpisodeFilter, default_spec
from edge_steer.models import EdgeVLA, EdgeVLAConfig
from edge_steer.models.heads import HeadRef

TINY = dict(image_size=32, stem_channels=(4, 8), d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8,
            mlp_ratio=2.0, chunk=4, language="embedding", max_lang_tokens=8, lang_buckets=64, augment_shift=0)
LEFT, RIGHT = "push the block to the left", "push the block to the right"
PLANTED = HeadRef(1, 2)


def write_demos(root: Path, episodes_per_task: int = 6, length: int = 12, seed: int = 0,
                tasks: tuple[str, ...] = (LEFT, RIGHT)) -> Path:
    """Episodes whose action is set by the instruction alone (+y for left, -y for right); the images
    and the state are noise, so only the language factor can matter."""
    rng = np.random.default_rng(seed)
    with DatasetWriter(root, default_spec(image_size=32)) as w:
        for _ in range(episodes_per_task):
            for task in tasks:
                w.begin_episode()
                sign = 1.0 if task == LEFT else -1.0
                for _t in range(length):
                    action = np.zeros(7, np.float32)
                    action[1] = 0.02 * sign
                    action[:3] += rng.normal(0, 0.002, 3)
                    w.add_frame({"observation.images.front": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                                 "observation.images.wrist": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                                 "observation.state": rng.normal(0, 0.1, 8).astype(np.float32),
                                 "observation.joints": np.zeros(7, np.float32), "action": action}, task=task)
                w.end_episode(success=True)
    return root


def tiny_model(seed: int = 0, **kw) -> EdgeVLA:
    torch.manual_seed(seed)
    return EdgeVLA(EdgeVLAConfig(**{**TINY, **kw}))


def planted_model(data: Path, steps: int = 150, seed: int = 0, **kw) -> EdgeVLA:
    """A tiny EdgeVLA in which PLANTED is the only head that writes into the residual stream (`plant`)."""
    return plant(tiny_model(seed, **kw), data, steps, seed)


def plant(model, data: Path, steps: int = 150, seed: int = 0, head: HeadRef = PLANTED, lr: float = 3e-3):
    """Train `model` (any VLAPolicy) so that `head` is the only head that writes into the residual
    stream: every other head's output-projection columns (from the head locator) are zero and kept
    there, so the instruction can reach the action queries through that head alone."""
    ds = Dataset(data)
    model.set_stats(ds.stats)
    params = dict(model.named_parameters())
    keep: dict[str, torch.Tensor] = {}
    for hs in model.heads():
        for s in hs.o:
            k = keep.setdefault(s.param, torch.zeros_like(params[s.param]))
            if hs.ref == head:
                k.narrow(s.dim, s.start, s.stop - s.start).fill_(1)
    for name, k in keep.items():
        with torch.no_grad():
            params[name].mul_(k)
        params[name].register_hook(lambda g, k=k: g * k)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        loss = model.loss(ds.sample(rng.integers(0, len(ds), 32), chunk=model.config.chunk))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for name, k in keep.items():   # AdamW-free Adam keeps zeros at zero; make sure
        assert torch.all(params[name][k == 0] == 0)
    model.final_loss = float(loss.detach())
    return model


def task_demos(data: Path, task: str = LEFT) -> Dataset:
    return Dataset(data, EpisodeFilter(tasks=task))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run on one intra-op thread: more threads only contend on a loaded box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
