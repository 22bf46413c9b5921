"""The vocabulary of attention heads shared by identify, finetune, report and export.

A head is `HeadRef(layer, head)`. `HeadSlices` says which rows/columns of which parameters belong to
it, and which module's *input* carries its activation: the output projection, whose input is the
head outputs side by side (..., n_heads * head_dim), head h at columns [h*head_dim, (h+1)*head_dim). Under grouped
query attention several query heads share one key/value head: `kv_head` names it, and its k/v rows
are shared (the steering room freezes them by default for that reason).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class HeadRef:
    layer: int
    head: int

    def __str__(self) -> str:
        return f"L{self.layer}.H{self.head}"

    @classmethod
    def parse(cls, text: str) -> "HeadRef":
        try:
            layer, head = text.upper().lstrip("L").split(".H")
            return cls(int(layer), int(head))
        except ValueError:
            raise ValueError(f"head reference {text!r} is not of the form 'L<layer>.H<head>'") from None


@dataclass(frozen=True)
class ParamSlice:
    """Rows (dim=0) or columns (dim=1) [start, stop) of the parameter named `param`."""

    param: str
    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class HeadSlices:
    ref: HeadRef
    q: tuple[ParamSlice, ...]
    k: tuple[ParamSlice, ...]
    v: tuple[ParamSlice, ...]
    o: tuple[ParamSlice, ...]
    kv_head: int
    hook: str           # module path whose input is (batch, tokens, n_heads * head_dim): the o projection
    head_dim: int

    def slices(self, which: str = "qo") -> tuple[ParamSlice, ...]:
        """The parameter slices for a subset of 'q', 'k', 'v', 'o' (e.g. 'qo', 'qkvo')."""
        bad = set(which) - set("qkvo")
        if bad:
            raise ValueError(f"slice selection {which!r} has letters other than q, k, v, o")
        return tuple(s for part in "qkvo" if part in which for s in getattr(self, part))
