"""The contract of the fused-attention op, and its reference semantics in numpy.

Op `edge_steer::fused_attention` (TensorRT plugin name `fused_attention`, namespace `edge_steer`).
It is the subset of onnxruntime's `com.microsoft::MultiHeadAttention` that edge-steer's exported
graphs use, so the TensorRT build can retype those nodes in place:

    inputs   q, k, v   (B, S, num_heads * head_dim), float32 | float16 | bfloat16, heads side by side
             key_mask  (B, S) int32, nonzero where a key may be attended to
    attrs    num_heads int, scale float (1/sqrt(head_dim) in edge-steer's graphs)
    output   (B, S, num_heads * head_dim), the dtype of q

    out[b, s, h] = sum_j softmax_j(scale * q[b, s, h] . k[b, j, h] + (0 if key_mask[b, j] else -10000)) v[b, j, h]

A masked key's score is lowered by 10000 (onnxruntime's mask_filter_value), not set to -inf: the
two agree wherever a row has a valid key, and this choice keeps a row with no valid key defined
(plain softmax of the unmasked scores) and identical across onnxruntime, the reference and the kernel.
Grouped-query attention is handled before the op (k/v heads repeated), so k and v have num_heads heads.
"""

from __future__ import annotations

import numpy as np

NAMESPACE = "edge_steer"
NAME = "fused_attention"
PLUGIN_ID = f"{NAMESPACE}::{NAME}"
MASK_FILTER_VALUE = -10000.0


def check_shapes(q_shape, k_shape, v_shape, mask_shape, num_heads: int) -> None:
    if len(q_shape) != 3 or tuple(k_shape) != tuple(q_shape) or tuple(v_shape) != tuple(q_shape):
        raise ValueError(f"q, k, v must share one (B, S, H*D) shape, got {q_shape}, {k_shape}, {v_shape}")
    if tuple(mask_shape) != tuple(q_shape[:2]):
        raise ValueError(f"key_mask must be (B, S) = {tuple(q_shape[:2])}, got {tuple(mask_shape)}")
    if num_heads <= 0 or q_shape[2] % num_heads:
        raise ValueError(f"hidden size {q_shape[2]} is not a multiple of num_heads={num_heads}")


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, key_mask: np.ndarray, num_heads: int,
              scale: float) -> np.ndarray:
    """The op in float64 numpy: what every implementation is checked against."""
    check_shapes(q.shape, k.shape, v.shape, key_mask.shape, num_heads)
    b, s, hidden = q.shape
    d = hidden // num_heads

    def heads(x):
        return np.asarray(x, dtype=np.float64).reshape(b, s, num_heads, d).transpose(0, 2, 1, 3)

    scores = scale * heads(q) @ heads(k).transpose(0, 1, 3, 2)                  # (B, H, S, S)
    scores = scores + np.where(np.asarray(key_mask) != 0, 0.0, MASK_FILTER_VALUE)[:, None, None, :]
    scores -= scores.max(-1, keepdims=True)
    w = np.exp(scores)
    w /= w.sum(-1, keepdims=True)
    return (w @ heads(v)).transpose(0, 2, 1, 3).reshape(b, s, hidden).astype(np.asarray(q).dtype)
