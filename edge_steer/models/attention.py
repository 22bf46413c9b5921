"""Multi-head attention written out so that every head is addressable.

q/k/v/o are plain Linear layers whose rows (q, k, v) and columns (o) are laid out head after head.
The input of `o_proj` is the head outputs side by side (batch, tokens, n_heads * head_dim): a forward
pre-hook on it reads or replaces any head's activation (mean ablation, activation patching,
attribution). Hugging Face attention modules have the same seam, so one hook mechanism
(`edge_steer.steering.hooks`) serves every model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model)
        self.keep_attention = False            # set by reports to keep the last attention map
        self.fused_in_training = False         # PyTorch's fused kernel in training too (benchmark baseline)
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, D); mask: (B, T) bool, True where a token may be attended to."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        attn_mask = None if mask is None else mask[:, None, None, :]
        # Written out when the weights are wanted, and in training: PyTorch's fused CPU kernel is
        # slow backward at these sizes (16-dim heads, ~100 tokens: 30 % of a pretraining step).
        # Inference and export keep the fused op, which ONNX exports as one attention node.
        if self.keep_attention or (self.training and torch.is_grad_enabled() and not self.fused_in_training):
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            w = scores.softmax(-1)
            if self.keep_attention:
                self.last_attention = w.detach()
            out = w @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, n_kv_heads, head_dim)
        self.ln2 = nn.LayerNorm(d_model)
        hidden = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))
