"""The graph that export traces: `EdgeVLA.forward` with two changes, both confined to attention.

1. Every attention layer's core (softmax(q k^T / sqrt(d)) v with the key-padding mask) becomes ONE
   `com.microsoft::MultiHeadAttention` node, the fused kernel onnxruntime runs on CPU and GPU. The
   TensorRT build retypes these nodes to our plugin (`engines/`), whose contract is the same op.
2. The steerable projection weights (q and o of every layer by default) are graph *inputs* with
   the base weights as their default values, so a served engine switches steering deltas by
   writing slices into host arrays, with no re-export and no new session.

Everything else is the model's own forward, traced as is. The replacement attention forward must
compute what `edge_steer.models.attention.Attention.forward` computes: the parity tests guard that.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from edge_steer.models.attention import Attention

FUSED_OP = "MultiHeadAttention"
FUSED_DOMAIN = "com.microsoft"
PROJECTIONS = ("q", "k", "v", "o")


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                        num_heads: int, scale: float) -> torch.Tensor:
    """The fused op's contract. q, k, v: (B, S, num_heads * head_dim), heads side by side;
    key_mask: (B, S) int32, 1 where a key may be attended to. -> (B, S, num_heads * head_dim)."""
    b, s, hd_all = q.shape
    hd = hd_all // num_heads

    def split(x):
        return x.view(b, x.shape[1], num_heads, hd).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=key_mask.bool()[:, None, None, :],
                                         scale=scale)
    return out.transpose(1, 2).reshape(b, s, hd_all)


class _FusedAttention(torch.autograd.Function):
    """Eager: the reference; under torch.onnx.export: one MultiHeadAttention node."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, num_heads: int, scale: float):
        return attention_reference(q, k, v, key_mask, num_heads, scale)

    @staticmethod
    def symbolic(g, q, k, v, key_mask, num_heads: int, scale: float):
        no_bias = g.op("prim::Constant")           # an absent optional input: exported as ""
        no_bias.setType(torch._C.OptionalType.ofTensor())
        out = g.op(f"{FUSED_DOMAIN}::{FUSED_OP}", q, k, v, no_bias, key_mask, num_heads_i=num_heads,
                   scale_f=scale)
        out.setType(q.type())                     # same shape and dtype as q
        return out


def steerable_params(model: nn.Module, projections: str = "qo") -> list[str]:
    """Names of the attention parameters that become graph inputs: the weight (and, for q/k/v, the
    bias: rows are per head) of each chosen projection of every layer, in module order."""
    bad = set(projections) - set(PROJECTIONS)
    if bad:
        raise ValueError(f"steerable projections {projections!r} has letters other than q, k, v, o")
    names = []
    for mname, m in model.named_modules():
        if isinstance(m, Attention):
            for p in PROJECTIONS:
                if p in projections:
                    names.append(f"{mname}.{p}_proj.weight")
                    if p != "o":       # the o bias is shared by all heads: no delta changes it
                        names.append(f"{mname}.{p}_proj.bias")
    return names


def input_name(param: str) -> str:
    """ONNX input name of a steerable parameter ('blocks.0.attn.q_proj.weight' -> 'steer.blocks.0.attn.q_proj.weight')."""
    return f"steer.{param}"


def _fused_forward(self: Attention, x: torch.Tensor, mask: torch.Tensor | None = None,
                   weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention.forward with a fused core and (optionally) projection weights from graph inputs."""
    w = weights or {}

    def proj(name: str, inp: torch.Tensor) -> torch.Tensor:
        lin = getattr(self, f"{name}_proj")
        return F.linear(inp, w.get(f"{name}.weight", lin.weight), w.get(f"{name}.bias", lin.bias))

    b, t, _ = x.shape
    q, k, v = proj("q", x), proj("k", x), proj("v", x)
    if self.n_kv_heads != self.n_heads:   # grouped-query: repeat each kv head for its query group
        rep = self.n_heads // self.n_kv_heads
        k, v = (z.view(b, t, self.n_kv_heads, 1, self.head_dim).expand(-1, -1, -1, rep, -1)
                .reshape(b, t, self.n_heads * self.head_dim) for z in (k, v))
    key_mask = (torch.ones(b, t, dtype=torch.int32) if mask is None else mask.to(torch.int32))
    out = _FusedAttention.apply(q, k, v, key_mask, self.n_heads, 1.0 / math.sqrt(self.head_dim))
    return proj("o", out)


class ExportGraph(nn.Module):
    """forward(images, state, lang, lang_mask, *steerable weights) -> normalised chunk."""

    def __init__(self, model: nn.Module, steerable: Sequence[str]):
        super().__init__()
        self.model = model
        self.steerable = list(steerable)
        self.attn = {n: m for n, m in model.named_modules() if isinstance(m, Attention)}

    def forward(self, images, state, lang, lang_mask, *weights):
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for name, w in zip(self.steerable, weights):
            module, proj, kind = name.rsplit(".", 2)
            by_module.setdefault(module, {})[f"{proj.removesuffix('_proj')}.{kind}"] = w
        with fused_attention(self.model, by_module):
            return self.model(images, state, lang, lang_mask)


@contextmanager
def fused_attention(model: nn.Module, weights: dict[str, dict[str, torch.Tensor]] | None = None) -> Iterator[None]:
    """Within the block, every Attention of `model` runs the fused forward (instance override)."""
    patched = []
    try:
        for name, m in model.named_modules():
            if isinstance(m, Attention):
                if m.keep_attention:
                    raise ValueError(f"{name} keeps its attention map (a report is running): no fused export")
                w = (weights or {}).get(name)
                m.forward = types.MethodType(lambda self, x, mask=None, _w=w: _fused_forward(self, x, mask, _w), m)
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward
