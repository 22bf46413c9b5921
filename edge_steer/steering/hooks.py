"""Reading and replacing attention-head outputs through the one seam every model has: the input of
its output projection, which holds the head outputs side by side (..., n_heads * head_dim).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

# fn(x) -> x', x: (B, T, n_heads * head_dim), the o projection's input
Edit = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def edit_head_inputs(model: nn.Module, edits: dict[str, Edit]) -> Iterator[None]:
    """While inside, each module named in `edits` sees fn(x) instead of x as its input."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for path, fn in edits.items():
            if path not in modules:
                raise KeyError(f"the model has no module {path!r} to hook")
            handles.append(modules[path].register_forward_pre_hook(lambda _m, args, fn=fn: (fn(args[0]), *args[1:])))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_head_inputs(model: nn.Module, paths: list[str], keep_grad: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Collects each named module's input (B, T, n_heads * head_dim) of the next forward into the
    yielded dict; with keep_grad the tensors retain their gradient after backward."""
    seen: dict[str, torch.Tensor] = {}

    def make(path):
        def hook(_m, args):
            x = args[0]
            if keep_grad:
                x.retain_grad()
                seen[path] = x
            else:
                seen[path] = x.detach()
        return hook

    modules = dict(model.named_modules())
    handles = [modules[p].register_forward_pre_hook(make(p)) for p in paths]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
