"""The graph that export traces: the model's own forward with two changes, both confined to attention.

1. Every attention layer's core (softmax(q k^T * scale + mask) v) becomes ONE
   `com.microsoft::MultiHeadAttention` node, the fused kernel onnxruntime runs on CPU and GPU. The
   TensorRT build retypes these nodes to our plugin (`edge_steer/engines/`), whose contract is the
   same op. Two kinds of attention are swapped, for the trace only:
   - our `edge_steer.models.attention.Attention` (EdgeVLA): an instance-level forward override;
   - Hugging Face transformers attention (BERT/MiniLM, Llama, Qwen2, Gemma, SigLIP, ... every model
     that dispatches through `ALL_ATTENTION_FUNCTIONS`): each transformers config inside the model is
     pointed at an attention function registered under `HF_ATTENTION`, which calls the same core.
2. The steerable projection weights are graph *inputs*: `ExportGraph` runs the model through
   `torch.func.functional_call` with those parameters replaced by its extra arguments. Which
   parameters they are comes from the head locator (`edge_steer.models.locate.locate_heads`), so
   any model whose heads the locator finds gets steerable q/o inputs, whatever its class.

The replacement forwards must compute what the originals compute: the parity tests guard that.
The attention core is pluggable (`core=`): the eager reference (SDPA), whose ONNX `symbolic` emits
the fused node, or the Triton kernel (the CUDA-graph engine).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from edge_steer.models.attention import Attention

FUSED_OP = "MultiHeadAttention"
FUSED_DOMAIN = "com.microsoft"
PROJECTIONS = ("q", "k", "v", "o")
HF_ATTENTION = "edge_steer_fused"        # the name our attention function is registered under in transformers
MASK_FILTER_VALUE = -10000.0             # onnxruntime's mask_filter_value; the plugin contract uses the same

# core(q, k, v, key_mask, num_heads, scale) -> out; q, k, v (B, S, H*D), key_mask (B, S) int32
Core = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


def _split(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, s, hd_all = x.shape
    return x.view(b, s, num_heads, hd_all // num_heads).transpose(1, 2)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                        num_heads: int, scale: float) -> torch.Tensor:
    """The fused op's contract. q, k, v: (B, S, num_heads * head_dim), heads side by side;
    key_mask: (B, S) int32, 1 where a key may be attended to. -> (B, S, num_heads * head_dim)."""
    b, s, hd_all = q.shape
    out = F.scaled_dot_product_attention(_split(q, num_heads), _split(k, num_heads), _split(v, num_heads),
                                         attn_mask=key_mask.bool()[:, None, None, :], scale=scale)
    return out.transpose(1, 2).reshape(b, s, hd_all)


def _absent(g):
    """An absent optional input of an ONNX node (exported as the empty name "")."""
    none = g.op("prim::Constant")
    none.setType(torch._C.OptionalType.ofTensor())
    return none


class _FusedAttention(torch.autograd.Function):
    """Eager: the reference; under torch.onnx.export: one MultiHeadAttention node (key-padding mask)."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, num_heads: int, scale: float):
        return attention_reference(q, k, v, key_mask, num_heads, scale)

    @staticmethod
    def symbolic(g, q, k, v, key_mask, num_heads: int, scale: float):
        out = g.op(f"{FUSED_DOMAIN}::{FUSED_OP}", q, k, v, _absent(g), key_mask, num_heads_i=num_heads, scale_f=scale)
        out.setType(q.type())                     # same shape and dtype as q
        return out


class _FusedAttentionBias(torch.autograd.Function):
    """As `_FusedAttention` with an additive (B|1, 1, S, S_kv) bias instead of a key mask: causal,
    sliding-window or any 4-D mask a transformers model builds. MultiHeadAttention's `attention_bias`."""

    @staticmethod
    def forward(ctx, q, k, v, bias, num_heads: int, scale: float):
        b, s, hd_all = q.shape
        out = F.scaled_dot_product_attention(_split(q, num_heads), _split(k, num_heads), _split(v, num_heads),
                                             attn_mask=bias, scale=scale)
        return out.transpose(1, 2).reshape(b, s, hd_all)

    @staticmethod
    def symbolic(g, q, k, v, bias, num_heads: int, scale: float):
        out = g.op(f"{FUSED_DOMAIN}::{FUSED_OP}", q, k, v, _absent(g), _absent(g), bias, num_heads_i=num_heads,
                   scale_f=scale)
        out.setType(q.type())
        return out


def reference_core(q, k, v, key_mask, num_heads: int, scale: float) -> torch.Tensor:
    return _FusedAttention.apply(q, k, v, key_mask, num_heads, scale)


# --- which parameters are steerable ------------------------------------------------------------------
def steerable_params(model: nn.Module, projections: str = "qo") -> list[str]:
    """Names of the parameters that become graph inputs: every parameter that holds a chosen
    projection's head slices (q/k/v weight and bias rows, o weight columns: the o bias is shared by all
    heads, so no delta changes it), as the head locator finds them, in `named_parameters()` order."""
    from edge_steer.models.locate import locate_heads

    bad = set(projections) - set(PROJECTIONS)
    if bad:
        raise ValueError(f"steerable projections {projections!r} has letters other than q, k, v, o")
    wanted = {s.param for hs in locate_heads(model) for s in hs.slices("".join(p for p in "qkvo" if p in projections))}
    return [n for n, _ in model.named_parameters() if n in wanted]


def n_attention_layers(model: nn.Module) -> int:
    """Attention modules the structural search finds in the whole model (a VLA's vision tower as well as
    the trunk its `heads()` numbers): what `check_fused` expects one fused node for."""
    from edge_steer.models.locate import UnsupportedModelError, find_heads, locate_heads
    try:
        return len({hs.hook for hs in find_heads(model)})
    except UnsupportedModelError:
        return len({hs.hook for hs in locate_heads(model)})


def input_name(param: str) -> str:
    """ONNX name of a steerable parameter ('blocks.0.attn.q_proj.weight' -> 'steer.blocks.0.attn.q_proj.weight')."""
    return f"steer.{param}"


# --- our attention ------------------------------------------------------------------------------------
def _fused_forward(self: Attention, x: torch.Tensor, mask: torch.Tensor | None, core: Core) -> torch.Tensor:
    """Attention.forward with a fused core."""
    b, t, _ = x.shape
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    if self.n_kv_heads != self.n_heads:   # grouped-query: repeat each kv head for its query group
        rep = self.n_heads // self.n_kv_heads
        k, v = (z.view(b, t, self.n_kv_heads, 1, self.head_dim).expand(-1, -1, -1, rep, -1)
                .reshape(b, t, self.n_heads * self.head_dim) for z in (k, v))
    key_mask = torch.ones(b, t, dtype=torch.int32, device=x.device) if mask is None else mask.to(torch.int32)
    return self.o_proj(core(q, k, v, key_mask, self.n_heads, 1.0 / math.sqrt(self.head_dim)))


# --- transformers attention ---------------------------------------------------------------------------
def _hf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, core: Core = reference_core, **kwargs):
    """transformers' attention-function signature: query (B, H, S, D), key/value (B, H_kv, S_kv, D),
    attention_mask None | bool (B|1, 1, S, S_kv) (built by the sdpa mask function) | additive float.
    Returns ((B, S, H, D), None) as `sdpa_attention_forward` does."""
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping (Gemma 2) has no fused export")
    if kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention with a position bias or sinks has no fused export")
    b, h, s, d = (int(n) for n in query.shape)       # ints: the tracer hands out sizes as tensors
    h_kv, s_kv = int(key.shape[1]), int(key.shape[2])
    if h_kv != h:                          # grouped-query: repeat each kv head for its query group
        key, value = (z[:, :, None].expand(b, h_kv, h // h_kv, s_kv, d).reshape(b, h, s_kv, d) for z in (key, value))
    q, k, v = (z.transpose(1, 2).reshape(b, n, h * d) for z, n in ((query, s), (key, s_kv), (value, s_kv)))
    scale = float(scaling) if scaling is not None else d ** -0.5
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if attention_mask is None and causal and s > 1:
        attention_mask = torch.ones(s, s_kv, dtype=torch.bool, device=q.device).tril()[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.shape[1:3] == (1, 1):
        # a key-padding mask (B, 1, 1, S_kv), as HFVLA's trunk passes: the fused node's key mask
        out = core(q, k, v, attention_mask[:, 0, 0].expand(b, s_kv).to(torch.int32), h, scale)
    elif attention_mask is None:
        out = core(q, k, v, torch.ones(b, s_kv, dtype=torch.int32, device=q.device), h, scale)
    else:
        if core is not reference_core:
            raise NotImplementedError("this attention core takes key-padding masks only; the model builds a "
                                      f"{tuple(attention_mask.shape)} mask (causal or 2-D padding)")
        bias = (torch.where(attention_mask, 0.0, MASK_FILTER_VALUE) if attention_mask.dtype == torch.bool
                else attention_mask.clamp(min=MASK_FILTER_VALUE)).to(q.dtype)
        out = _FusedAttentionBias.apply(q, k, v, bias, h, scale)
    return out.view(b, s, h, d), None


def _hf_configs(model: nn.Module) -> list:
    """Every transformers config reachable from the model's modules (a VLA has one per tower)."""
    seen: dict[int, object] = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation_internal") and id(c) not in seen:
            seen[id(c)] = c
    return list(seen.values())


def _register_hf(core: Core) -> str:
    """Register the attention (and its mask: sdpa's boolean masks) with transformers under a name per core."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    name = HF_ATTENTION if core is reference_core else f"{HF_ATTENTION}_{getattr(core, '__name__', id(core))}"
    AttentionInterface.register(name, lambda *a, **kw: _hf_attention(*a, core=core, **kw))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


@contextmanager
def _hf_fused(model: nn.Module, core: Core) -> Iterator[None]:
    """Within the block every transformers config of the model names our attention function."""
    configs = _hf_configs(model)
    name = _register_hf(core) if configs else ""
    before = [c._attn_implementation_internal for c in configs]
    try:
        for c in configs:
            c._attn_implementation_internal = name
        yield
    finally:
        for c, v in zip(configs, before):
            c._attn_implementation_internal = v


@contextmanager
def fused_attention(model: nn.Module, core: Core = reference_core) -> Iterator[None]:
    """Within the block every attention of `model` (ours and transformers') runs `core`."""
    patched = []
    with ExitStack() as stack:
        try:
            for name, m in model.named_modules():
                if isinstance(m, Attention):
                    if m.keep_attention:
                        raise ValueError(f"{name} keeps its attention map (a report is running): no fused export")
                    m.forward = types.MethodType(lambda self, x, mask=None: _fused_forward(self, x, mask, core), m)
                    patched.append(m)
            stack.enter_context(_hf_fused(model, core))
            yield
        finally:
            for m in patched:
                del m.forward


class ExportGraph(nn.Module):
    """forward(*model inputs, *steerable weights) -> model(*model inputs), with the attention fused
    and the parameters named in `steerable` taken from the extra arguments."""

    def __init__(self, model: nn.Module, steerable: Sequence[str], core: Core = reference_core):
        super().__init__()
        self.model = model
        self.steerable = list(steerable)
        self.core = core

    def forward(self, *args):
        n = len(args) - len(self.steerable)
        with fused_attention(self.model, self.core), parameters_from(self.model, dict(zip(self.steerable, args[n:]))):
            return self.model(*args[:n])


@contextmanager
def parameters_from(model: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block the named parameters of `model` are the given tensors (so a trace sees them as
    the graph's inputs). torch.func.functional_call does this too, but refuses under the jit tracer."""
    swapped = []
    try:
        for name, t in tensors.items():
            module_path, _, leaf = name.rpartition(".")
            m = model.get_submodule(module_path)
            if leaf not in m._parameters:
                raise KeyError(f"{name} is not a parameter of the model")
            swapped.append((m, leaf, m._parameters[leaf]))
            m._parameters[leaf] = t          # the dict, not setattr: a plain tensor in a Parameter's place
        yield
    finally:
        for m, leaf, p in reversed(swapped):
            m._parameters[leaf] = p
