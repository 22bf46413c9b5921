"""The head locator on tiny randomly initialised models (built offline, no hub downloads).

The behavioural tests tie the three parts of `HeadSlices` together: zeroing a head's o columns in the
weights equals zeroing its columns of the hook module's input, and q / v rows reach exactly the hook
columns of the heads that use them (which also checks the grouped-query kv_head mapping).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from edge_steer.models.heads import HeadRef, HeadSlices  # noqa: E402
from edge_steer.models.vla import EdgeVLA, EdgeVLAConfig  # noqa: E402
from edge_steer.models.locate import (  # noqa: E402
    UnsupportedModelError, check_heads, head_columns, head_index, locate_heads, slice_tensor)

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: extra threads only contend (a training job shares this machine's cores).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


DEC = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
           num_hidden_layers=2, vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VIS = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
           image_size=16, patch_size=8, num_channels=3)


def _ids() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[1, 5, 7, 9, 11, 13]])}


def _pixels() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))}


def _edge_vla() -> nn.Module:
    return EdgeVLA(EdgeVLAConfig(image_size=32, stem_channels=(8, 16), d_model=32, n_layers=2, n_heads=4,
                                 n_kv_heads=2, head_dim=8, mlp_ratio=2.0, chunk=2, language="embedding",
                                 max_lang_tokens=4, lang_buckets=16))


def _edge_vla_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"images": torch.rand(1, 2, 3, 32, 32, generator=g) * 4 - 2, "state": torch.randn(1, 8, generator=g),
            "lang": torch.tensor([[1, 2, 3, 0]]), "lang_mask": torch.tensor([[True, True, True, False]])}


def _hf(config_cls: str, model_cls: str, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = getattr(transformers, config_cls)(**kw)
        config._attn_implementation = "eager"
        return getattr(transformers, model_cls)(config)
    return build


# name: (builder, inputs, layers, heads, kv heads, head_dim)
CASES = {
    "llama": (_hf("LlamaConfig", "LlamaModel", **DEC), _ids, 2, 4, 2, 8),
    "qwen2": (_hf("Qwen2Config", "Qwen2Model", **DEC), _ids, 2, 4, 2, 8),
    "gemma": (_hf("GemmaConfig", "GemmaModel", **DEC, head_dim=16), _ids, 2, 4, 2, 16),
    "phi3": (_hf("Phi3Config", "Phi3Model", **DEC), _ids, 2, 4, 2, 8),
    "siglip": (_hf("SiglipVisionConfig", "SiglipVisionModel", **VIS), _pixels, 2, 4, 4, 8),
    "vit": (_hf("ViTConfig", "ViTModel", **VIS, add_pooling_layer=False), _pixels, 2, 4, 4, 8),
    "bert": (_hf("BertConfig", "BertModel", hidden_size=32, num_attention_heads=4, intermediate_size=64,
                 num_hidden_layers=2, vocab_size=100, add_pooling_layer=False), _ids, 2, 4, 4, 8),
    "gpt2": (_hf("GPT2Config", "GPT2Model", n_embd=32, n_head=4, n_layer=2, vocab_size=100, n_positions=16,
                 bos_token_id=1, eos_token_id=2),
             _ids, 2, 4, 4, 8),
    "t5": (_hf("T5Config", "T5EncoderModel", d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64,
               vocab_size=100), _ids, 2, 4, 4, 8),
    "edge_vla": (_edge_vla, _edge_vla_inputs, 2, 4, 2, 8),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    build, inputs, *shape = CASES[request.param]
    torch.manual_seed(0)
    model = build().eval()
    # HF's std-0.02 init makes a single head's effect tiny; larger weights make "changes" tests meaningful.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return request.param, model, inputs(), shape


def _run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def _hook_input(model: nn.Module, hs: HeadSlices, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(hs.hook).register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        _run(model, inputs)
    finally:
        handle.remove()
    return seen[0]


def _zeroed(model: nn.Module, slices) -> dict[str, torch.Tensor]:
    """Zero the given slices in place; return the old values of their parameters for restoring."""
    params = dict(model.named_parameters())
    saved = {s.param: params[s.param].detach().clone() for s in slices}
    with torch.no_grad():
        for s in slices:
            slice_tensor(params[s.param], s).zero_()
    return saved


def _restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def test_counts_and_shapes(case):
    name, model, _, (n_layers, n_heads, n_kv, hd) = case
    heads = locate_heads(model)
    assert len(heads) == n_layers * n_heads
    assert [hs.ref for hs in heads] == [HeadRef(l, h) for l in range(n_layers) for h in range(n_heads)]
    params = dict(model.named_parameters())
    for hs in heads:
        assert hs.head_dim == hd and hs.kv_head == hs.ref.head // (n_heads // n_kv)
        assert head_columns(hs) == slice(hs.ref.head * hd, (hs.ref.head + 1) * hd)
        hook = model.get_submodule(hs.hook)
        assert hook.weight.numel() == params[hs.o[0].param].numel()
        for s in hs.slices("qkvo"):
            assert s.stop - s.start == hd
            assert slice_tensor(params[s.param], s).shape[s.dim] == hd
        assert hs.q and hs.k and hs.v and len(hs.o) == 1
        # biases go with their weight wherever the projection has one
        assert {s.param.rsplit(".", 1)[1] for s in hs.q} <= {"weight", "bias"}
        assert all(s.param.startswith(hs.hook.rsplit(".", 1)[0]) or name == "bert" for s in hs.slices("qkvo"))
    check_heads(model, heads)
    assert head_index(model)[HeadRef(1, 3)] == heads[-1]


def test_gqa_heads_share_kv_slices(case):
    _, model, _, (n_layers, n_heads, n_kv, _) = case
    by_ref = head_index(model)
    group = n_heads // n_kv
    for layer in range(n_layers):
        for h in range(n_heads):
            a, b = by_ref[HeadRef(layer, h)], by_ref[HeadRef(layer, (h // group) * group)]
            assert (a.k, a.v) == (b.k, b.v)
            assert a.q != b.q or h % group == 0
        kv = {by_ref[HeadRef(layer, h)].k for h in range(n_heads)}
        assert len(kv) == n_kv


def test_o_columns_match_hook_seam(case):
    """Zeroing head h's o columns == zeroing its hook-input columns, and it changes the output."""
    _, model, inputs, _ = case
    heads = locate_heads(model)
    base = _run(model, inputs)
    for hs in (heads[1], heads[-2]):      # one head of the first layer, one of the last
        saved = _zeroed(model, hs.o)
        by_weight = _run(model, inputs)
        _restore(model, saved)

        def ablate(module, args, cols=head_columns(hs)):
            x = args[0].clone()
            x[..., cols] = 0
            return (x, *args[1:])

        handle = model.get_submodule(hs.hook).register_forward_pre_hook(ablate)
        by_hook = _run(model, inputs)
        handle.remove()
        torch.testing.assert_close(by_weight, by_hook, rtol=1e-5, atol=1e-5)
        assert (by_weight - base).abs().max() > 1e-3
    torch.testing.assert_close(_run(model, inputs), base)


def test_q_and_v_rows_reach_exactly_their_heads(case):
    """q rows of head h move only head h's hook columns; v rows of a kv head move exactly its group."""
    _, model, inputs, (_, n_heads, _, hd) = case
    heads = [hs for hs in locate_heads(model) if hs.ref.layer == 1]
    base = _hook_input(model, heads[0], inputs)

    def changed_heads(slices) -> set[int]:
        saved = _zeroed(model, slices)
        after = _hook_input(model, heads[0], inputs)
        _restore(model, saved)
        diff = (after - base).abs().amax(dim=tuple(range(after.ndim - 1)))
        return {h for h in range(n_heads) if diff[h * hd:(h + 1) * hd].max() > 1e-6}

    target = heads[2]
    assert changed_heads(target.q) == {2}
    assert changed_heads(target.v) == {hs.ref.head for hs in heads if hs.kv_head == target.kv_head}


def test_under_restricts_and_renumbers():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DEC))
    whole = locate_heads(model)
    inner = locate_heads(model, under="model.layers.1")
    assert [hs.ref for hs in inner] == [HeadRef(0, h) for h in range(4)]
    assert [hs.q for hs in inner] == [hs.q for hs in whole[4:]]
    assert inner[0].hook == "model.layers.1.self_attn.o_proj"
    with pytest.raises(ValueError, match="no submodule"):
        locate_heads(model, under="model.nope")
    vla = _edge_vla()
    sub = locate_heads(vla, under="blocks.1")
    assert [hs.ref.layer for hs in sub] == [0] * 4 and sub[0].hook == "blocks.1.attn.o_proj"


def test_unrecognised_model_names_its_class():
    with pytest.raises(UnsupportedModelError, match="Sequential"):
        locate_heads(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(UnsupportedModelError, match="MultiheadAttention"):
        locate_heads(nn.TransformerEncoderLayer(d_model=8, nhead=2))


def test_check_heads_rejects_another_models_heads():
    torch.manual_seed(0)
    small = transformers.LlamaModel(transformers.LlamaConfig(**DEC))
    wide = transformers.LlamaModel(transformers.LlamaConfig(**{**DEC, "hidden_size": 64, "num_attention_heads": 8}))
    with pytest.raises(ValueError, match="does not fit"):
        check_heads(small, locate_heads(wide))
    with pytest.raises(ValueError, match="no module"):
        check_heads(small, locate_heads(_edge_vla()))
