"""The head locator: every attention head of a model as `HeadSlices`.

This is the only place that knows how an architecture lays out q/k/v/o. Every model's `heads()`
(EdgeVLA's, HFVLA's) is `find_heads` over its trunk; for any other module (Hugging Face transformers
and anything built the same way) `locate_heads` recognises attention modules structurally while
walking `named_modules()`:

| layout | q, k, v | output projection (the hook) | seen in |
|---|---|---|---|
| separate | `q_proj`, `k_proj`, `v_proj` | sibling `o_proj` or `out_proj` | Llama, Qwen2, Gemma, Mistral, SigLIP, CLIP, ViT (transformers 5) |
| separate, short | `q`, `k`, `v` | sibling `o` | T5 |
| fused Linear | `qkv_proj` rows q, k, v | sibling `o_proj` | Phi-3 |
| fused Conv1D | `c_attn` columns q, k, v (`q_attn` for cross attention) | sibling `c_proj` | GPT-2 |
| legacy | `query`, `key`, `value` | `output.dense` of the parent | BERT, ViT/DeiT (transformers 4) |

`nn.MultiheadAttention` (e.g. SigLIP's pooling head) is skipped: it applies its `out_proj` weight
functionally, so a hook on that module never fires and the steering room's seam would be dead.

Layers are numbered in module order over the recognised attention modules. Parameter names and hook
paths are always relative to the model passed in, so they match `model.named_parameters()` even when
`under=` restricts the search to one tower.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from edge_steer.models.heads import HeadRef, HeadSlices, ParamSlice

# (parameter name, dim, offset): head i of this projection spans [offset + i*hd, offset + (i+1)*hd) along dim.
_Seg = tuple[str, int, int]


@dataclass(frozen=True)
class _Attention:
    """One recognised attention module, before it is cut into heads."""

    hook: str
    head_dim: int
    n_heads: int
    n_kv: int
    q: tuple[_Seg, ...]
    k: tuple[_Seg, ...]
    v: tuple[_Seg, ...]
    o: tuple[_Seg, ...]


class UnsupportedModelError(ValueError):
    """The model has no attention layout the locator knows."""


# --- public API ------------------------------------------------------------------------------------

def locate_heads(model: nn.Module, under: str | None = None) -> list[HeadSlices]:
    """Every attention head of `model`, ordered by (layer, head).

    `under` limits the search to one submodule path (e.g. the language model of a VLA); its attention
    modules are then numbered from layer 0, while names stay relative to `model`.
    """
    if _has_heads_method(model):
        heads = list(model.heads())
        return _restrict(heads, under) if under else heads
    return find_heads(model, under)


def find_heads(model: nn.Module, under: str | None = None) -> list[HeadSlices]:
    """The structural search alone (what a model's own `heads()` calls on its trunk)."""
    root = model
    if under:
        try:
            root = model.get_submodule(under)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no submodule {under!r}") from None
    found = _find_attention(model, root, under or "")
    if not found:
        raise UnsupportedModelError(_no_attention_message(model, root))
    return [hs for layer, att in enumerate(found) for hs in _cut(att, layer)]


def head_index(model: nn.Module, under: str | None = None) -> dict[HeadRef, HeadSlices]:
    """`locate_heads` keyed by `HeadRef`, for looking heads from a heads file up."""
    return {hs.ref: hs for hs in locate_heads(model, under)}


def slice_tensor(tensor: torch.Tensor, s: ParamSlice) -> torch.Tensor:
    """The view of `tensor` (the parameter named `s.param`, or its gradient) that `s` selects."""
    if s.dim >= tensor.ndim or not 0 <= s.start < s.stop <= tensor.shape[s.dim]:
        raise ValueError(f"slice {s} does not fit {s.param} of shape {tuple(tensor.shape)}")
    return tensor.narrow(s.dim, s.start, s.stop - s.start)


def head_columns(hs: HeadSlices) -> slice:
    """The columns of the hook module's input that carry this head's output."""
    return slice(hs.ref.head * hs.head_dim, (hs.ref.head + 1) * hs.head_dim)


def check_heads(model: nn.Module, heads: list[HeadSlices]) -> None:
    """Raise a clear error when `heads` (e.g. read from a heads file) do not fit `model`."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for hs in heads:
        if hs.hook not in modules:
            raise ValueError(f"head {hs.ref}: the model has no module {hs.hook!r} (a heads file from another model?)")
        for s in hs.slices("qkvo"):
            if s.param not in params:
                raise ValueError(f"head {hs.ref}: the model has no parameter {s.param!r} (a heads file from another model?)")
            slice_tensor(params[s.param], s)


# --- discovery -------------------------------------------------------------------------------------

def _has_heads_method(model: nn.Module) -> bool:
    # A ModuleList called `heads` (some HF models have one) is callable too, hence the method check.
    return inspect.ismethod(getattr(model, "heads", None))


def _restrict(heads: list[HeadSlices], under: str) -> list[HeadSlices]:
    kept = [hs for hs in heads if hs.hook.startswith(under + ".")]
    if not kept:
        raise ValueError(f"no attention heads under {under!r}")
    renumber = {layer: i for i, layer in enumerate(sorted({hs.ref.layer for hs in kept}))}
    return [HeadSlices(HeadRef(renumber[hs.ref.layer], hs.ref.head), hs.q, hs.k, hs.v, hs.o,
                       hs.kv_head, hs.hook, hs.head_dim) for hs in kept]


def _find_attention(model: nn.Module, root: nn.Module, prefix: str) -> list[_Attention]:
    found = []
    for rel, module in root.named_modules():
        path = f"{prefix}.{rel}" if prefix and rel else (prefix or rel)
        children = dict(module.named_children())
        for match in (_separate, _fused_linear, _fused_conv1d, _legacy):
            att = match(model, path, module, children)
            if att is not None:
                found.append(att)
                break
    return found


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_linear(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Linear)


def _is_conv1d(m: nn.Module | None) -> bool:
    # transformers' Conv1D: a Linear with a transposed (in, out) weight; duck-typed to avoid importing it.
    w = getattr(m, "weight", None)
    return (m is not None and hasattr(m, "nf") and hasattr(m, "nx") and isinstance(w, torch.Tensor)
            and tuple(w.shape) == (m.nx, m.nf))


def _out_features(m: nn.Module) -> int:
    return m.nf if _is_conv1d(m) else m.out_features


def _in_features(m: nn.Module) -> int:
    return m.nx if _is_conv1d(m) else m.in_features


def _rows(path: str, m: nn.Module, offset: int = 0) -> tuple[_Seg, ...]:
    """Segments for the output features of a projection: its weight and, where present, its bias."""
    wdim = 1 if _is_conv1d(m) else 0
    segs: tuple[_Seg, ...] = ((f"{path}.weight", wdim, offset),)
    if getattr(m, "bias", None) is not None:
        segs += ((f"{path}.bias", 0, offset),)
    return segs


def _cols(path: str, m: nn.Module) -> tuple[_Seg, ...]:
    """Segments for the input features of the output projection (its bias is not per head)."""
    return ((f"{path}.weight", 0 if _is_conv1d(m) else 1, 0),)


def _separate(model: nn.Module, path: str, module: nn.Module, ch: dict[str, nn.Module]) -> _Attention | None:
    for qn, kn, vn, outs in (("q_proj", "k_proj", "v_proj", ("o_proj", "out_proj")), ("q", "k", "v", ("o",))):
        q, k, v = ch.get(qn), ch.get(kn), ch.get(vn)
        on = next((n for n in outs if _is_linear(ch.get(n))), None)
        if not (_is_linear(q) and _is_linear(k) and _is_linear(v) and on):
            continue
        o = ch[on]
        hd = _head_dim(model, module, q.out_features)
        return _checked(module, path, _Attention(
            hook=_join(path, on), head_dim=hd, n_heads=q.out_features // hd, n_kv=k.out_features // hd,
            q=_rows(_join(path, qn), q), k=_rows(_join(path, kn), k), v=_rows(_join(path, vn), v),
            o=_cols(_join(path, on), o)), q.out_features, k.out_features, v.out_features, o.in_features)
    return None


def _fused_linear(model: nn.Module, path: str, module: nn.Module, ch: dict[str, nn.Module]) -> _Attention | None:
    qkv, o = ch.get("qkv_proj"), ch.get("o_proj")
    if not (_is_linear(qkv) and _is_linear(o)):
        return None
    # q is as wide as o's input; k and v split the rest equally (q | k | v, Phi-3 order).
    hd = _head_dim(model, module, o.in_features)
    q_out = o.in_features
    kv_out = (qkv.out_features - q_out) // 2
    p = _join(path, "qkv_proj")
    return _checked(module, path, _Attention(
        hook=_join(path, "o_proj"), head_dim=hd, n_heads=q_out // hd, n_kv=kv_out // hd,
        q=_rows(p, qkv, 0), k=_rows(p, qkv, q_out), v=_rows(p, qkv, q_out + kv_out),
        o=_cols(_join(path, "o_proj"), o)), q_out, kv_out, qkv.out_features - q_out - kv_out, o.in_features)


def _fused_conv1d(model: nn.Module, path: str, module: nn.Module, ch: dict[str, nn.Module]) -> _Attention | None:
    c_attn, c_proj, q_attn = ch.get("c_attn"), ch.get("c_proj"), ch.get("q_attn")
    if not (_is_conv1d(c_attn) and _is_conv1d(c_proj)):
        return None
    inner = _in_features(c_proj)
    hd = _head_dim(model, module, inner)
    p = _join(path, "c_attn")
    if _is_conv1d(q_attn):      # cross attention: q from q_attn, k | v from c_attn
        q = _rows(_join(path, "q_attn"), q_attn)
        k, v = _rows(p, c_attn, 0), _rows(p, c_attn, inner)
        widths = (_out_features(q_attn), inner, _out_features(c_attn) - inner)
    else:                       # self attention: q | k | v
        q, k, v = _rows(p, c_attn, 0), _rows(p, c_attn, inner), _rows(p, c_attn, 2 * inner)
        widths = (inner, inner, _out_features(c_attn) - 2 * inner)
    return _checked(module, path, _Attention(
        hook=_join(path, "c_proj"), head_dim=hd, n_heads=inner // hd, n_kv=inner // hd,
        q=q, k=k, v=v, o=_cols(_join(path, "c_proj"), c_proj)), *widths, inner)


def _legacy(model: nn.Module, path: str, module: nn.Module, ch: dict[str, nn.Module]) -> _Attention | None:
    q, k, v = ch.get("query"), ch.get("key"), ch.get("value")
    if not (_is_linear(q) and _is_linear(k) and _is_linear(v)):
        return None
    # The output projection is not a child: it is `output.dense` of the parent (e.g. BertAttention).
    o_path = _join(path.rpartition(".")[0], "output.dense")
    try:
        o = model.get_submodule(o_path)
    except AttributeError:
        o = None
    if not _is_linear(o):
        raise UnsupportedModelError(
            f"{type(module).__name__} at {path!r} has query/key/value but no output projection at {o_path!r}")
    hd = _head_dim(model, module, q.out_features)
    return _checked(module, path, _Attention(
        hook=o_path, head_dim=hd, n_heads=q.out_features // hd, n_kv=k.out_features // hd,
        q=_rows(_join(path, "query"), q), k=_rows(_join(path, "key"), k), v=_rows(_join(path, "value"), v),
        o=_cols(o_path, o)), q.out_features, k.out_features, v.out_features, o.in_features)


_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size")
_N_HEADS_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")


def _head_dim(model: nn.Module, module: nn.Module, q_width: int) -> int:
    """head_dim from the attention module itself, else from its config, else from the model's config."""
    for attr in _HEAD_DIM_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    for attr in _N_HEADS_ATTRS:
        n = getattr(module, attr, None)
        if isinstance(n, int) and n > 0:
            return q_width // n
    for config in (getattr(module, "config", None), getattr(model, "config", None)):
        if config is None:
            continue
        if isinstance(getattr(config, "head_dim", None), int):
            return config.head_dim
        n = getattr(config, "num_attention_heads", None)
        if isinstance(n, int) and n > 0:
            return q_width // n
    raise UnsupportedModelError(
        f"cannot tell the head size of {type(module).__name__}: it has none of {_HEAD_DIM_ATTRS + _N_HEADS_ATTRS} "
        "and no config with head_dim or num_attention_heads")


def _checked(module: nn.Module, path: str, att: _Attention, q_out: int, k_out: int, v_out: int,
             o_in: int) -> _Attention:
    hd, name = att.head_dim, f"{type(module).__name__} at {path!r}"
    if hd <= 0 or q_out % hd or k_out % hd or k_out != v_out or k_out <= 0:
        raise UnsupportedModelError(
            f"{name}: q/k/v widths {q_out}/{k_out}/{v_out} are not whole heads of size {hd}")
    if o_in != q_out:
        raise UnsupportedModelError(f"{name}: output projection takes {o_in} features, q gives {q_out}")
    if att.n_heads % att.n_kv:
        raise UnsupportedModelError(f"{name}: {att.n_heads} query heads do not share {att.n_kv} key/value heads evenly")
    return att


def _cut(att: _Attention, layer: int) -> list[HeadSlices]:
    hd, group = att.head_dim, att.n_heads // att.n_kv

    def part(segs: tuple[_Seg, ...], i: int) -> tuple[ParamSlice, ...]:
        return tuple(ParamSlice(name, dim, off + i * hd, off + (i + 1) * hd) for name, dim, off in segs)

    return [HeadSlices(ref=HeadRef(layer, h), q=part(att.q, h), k=part(att.k, h // group),
                       v=part(att.v, h // group), o=part(att.o, h), kv_head=h // group,
                       hook=att.hook, head_dim=hd)
            for h in range(att.n_heads)]


def _no_attention_message(model: nn.Module, root: nn.Module) -> str:
    msg = (f"{type(model).__name__} has no attention the head locator recognises (looked for q_proj/k_proj/"
           "v_proj with o_proj|out_proj, q/k/v/o, qkv_proj with o_proj, c_attn with c_proj, and query/key/"
           "value with output.dense)")
    if any(isinstance(m, nn.MultiheadAttention) for m in root.modules()):
        msg += ("; its nn.MultiheadAttention modules are not supported because they apply out_proj "
                "functionally, leaving no module whose input carries the head outputs")
    return msg
