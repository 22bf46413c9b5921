"""The fused-attention kernel in Triton: one pass over the keys with an online softmax
(flash-attention style), so the (S, S) score matrix never reaches global memory.

Grid: (ceil(S / BLOCK_M), B * num_heads). A program owns BLOCK_M queries of one head of one batch
row, streams BLOCK_N keys/values at a time, and keeps a running max and normaliser per query. The
head dimension is padded to a power of two >= 16 (tl.dot's minimum) and masked on load and store.
The number of key blocks is a compile-time constant (one compilation per sequence length, which an
engine fixes), which also keeps the loop runnable in Triton's interpreter.
Accumulation is float32 whatever the I/O dtype (float32 / float16 / bfloat16). For float32 I/O the
precision of tl.dot is chosen explicitly (`precision=`): Triton's default on tensor-core GPUs is
TF32, which would miss the contract's 1e-4.

On a CPU, `TRITON_INTERPRET=1` runs this same kernel through Triton's interpreter on torch CPU
tensors; the tests use that to check the kernel's math against `contract.reference`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .contract import MASK_FILTER_VALUE, check_shapes


@triton.jit
def _fused_attention_fwd(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, S, HIDDEN, HEAD_DIM, NUM_HEADS, scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         N_KV_BLOCKS: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NUM_HEADS
    h = pid_bh % NUM_HEADS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    base = b * S * HIDDEN + h * HEAD_DIM            # element (b, 0, h, 0) of a (B, S, H*D) tensor
    d_ok = offs_d[None, :] < HEAD_DIM
    q = tl.load(q_ptr + base + offs_m[:, None] * HIDDEN + offs_d[None, :], mask=(offs_m[:, None] < S) & d_ok,
                other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for i in range(N_KV_BLOCKS):
        offs_n = i * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S
        kv_off = base + offs_n[:, None] * HIDDEN + offs_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=n_ok[:, None] & d_ok, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=n_ok[:, None] & d_ok, other=0.0)
        key_ok = tl.load(mask_ptr + b * S + offs_n, mask=n_ok, other=0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        s = s + tl.where(key_ok[None, :] != 0, 0.0, MASK_FILTER_VALUE)
        s = tl.where(n_ok[None, :], s, float("-inf"))           # keys past the end do not exist
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + base + offs_m[:, None] * HIDDEN + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < S) & d_ok)


PRECISIONS = ("ieee", "tf32")
TOLERANCE = {"ieee": 1e-4, "tf32": 5e-3}    # fp32 I/O: max rel err against the float64 reference on a GPU


def launch(q, k, v, key_mask, out, num_heads: int, scale: float, block_m: int = 32, block_n: int = 32,
           precision: str = "ieee") -> None:
    """Run the kernel on torch tensors (CUDA, or CPU under TRITON_INTERPRET=1); writes `out`.
    precision: how tl.dot multiplies float32 inputs. "ieee" (default) is full fp32, the contract's
    1e-4; "tf32" uses tensor cores (10-bit mantissa inputs, ~5e-3). Half/bfloat16 inputs ignore it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    check_shapes(tuple(q.shape), tuple(k.shape), tuple(v.shape), tuple(key_mask.shape), num_heads)
    for name, t in (("q", q), ("k", k), ("v", v), ("key_mask", key_mask), ("out", out)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    b, s, hidden = q.shape
    head_dim = hidden // num_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    grid = (triton.cdiv(s, block_m), b * num_heads)
    _fused_attention_fwd[grid](q, k, v, key_mask, out, s, hidden, head_dim, num_heads, float(scale),
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                               N_KV_BLOCKS=triton.cdiv(s, block_n), PRECISION=precision)
