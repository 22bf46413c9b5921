"""Export of transformers attention (issue 45 item 5): tiny random BERT (MiniLM-shaped), Llama, Qwen2 (GQA),
Gemma and SigLIP models, built offline, traced through the same mechanism as EdgeVLA: one fused
com.microsoft::MultiHeadAttention node per layer, no Softmax left, the q/o weights the head locator finds
as steerable initializers, parity with torch <= 1e-4, and steering switched at run time by feeding them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edge_steer.export import ExportError, check_fused
from edge_steer.export.graph import fused_attention, input_name, n_attention_layers, steerable_params
from edge_steer.export.onnx_export import steerable_as_inputs, trace_onnx
from edge_steer.models.locate import locate_heads

transformers = pytest.importorskip("transformers")
RTOL = 1e-4


class Tower(nn.Module):
    """A transformers model as one tower of a VLA: tensors in, one tensor out (last hidden state
    through a small head), as a VLA's forward would use it."""

    def __init__(self, model: nn.Module, out: int, **call):
        super().__init__()
        self.model, self.call = model, call
        self.head = nn.Linear(model.config.hidden_size, 3)

    def forward(self, *args):
        kw = dict(zip(self.call["names"], args))
        return self.head(self.model(**kw).last_hidden_state)


def _tiny(kind: str):
    t = transformers
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    ids = torch.randint(0, 100, (2, 9))
    if kind == "bert":                     # MiniLM-shaped encoder, with a padding mask (a 4-D boolean mask)
        m = t.BertModel(t.BertConfig(vocab_size=100, max_position_embeddings=32, **common), add_pooling_layer=False)
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0
        return (Tower(m, 3, names=("input_ids", "attention_mask", "token_type_ids")),
                {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    if kind in ("llama", "qwen2", "gemma"):  # causal decoders; Llama and Qwen2 with grouped-query attention
        cfg = {"llama": t.LlamaConfig, "qwen2": t.Qwen2Config, "gemma": t.GemmaConfig}[kind](
            vocab_size=100, num_key_value_heads=1 if kind == "gemma" else 2, head_dim=8, max_position_embeddings=32,
            **common)
        model_cls = {"llama": t.LlamaModel, "qwen2": t.Qwen2Model, "gemma": t.GemmaModel}[kind]
        return Tower(model_cls(cfg), 3, names=("input_ids",)), {"input_ids": ids}
    if kind == "siglip":                   # a vision tower, no mask
        cfg = t.SiglipVisionConfig(image_size=32, patch_size=8, num_channels=3, vision_use_head=False, **common)
        return (Tower(t.SiglipVisionModel(cfg), 3, names=("pixel_values",)),
                {"pixel_values": torch.randn(2, 3, 32, 32)})
    raise ValueError(kind)


def _perturbed_qo(model: nn.Module, names: list[str], seed: int = 1) -> dict[str, torch.Tensor]:
    """New values for head 0's q rows and o columns in every layer (a steering delta's shape)."""
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    new = {n: params[n].detach().clone() for n in names}
    for s in (s for hs in locate_heads(model) if hs.ref.head == 0 for s in hs.slices("qo")):
        idx = slice(s.start, s.stop)
        target = new[s.param]
        if s.dim == 0:
            target[idx] += 0.5 * torch.randn(target[idx].shape, generator=g)
        else:
            target[:, idx] += 0.5 * torch.randn(target[:, idx].shape, generator=g)
    return new


@pytest.mark.parametrize("kind", ["bert", "llama", "qwen2", "gemma", "siglip"])
def test_transformers_attention_exports_fused_with_steerable_qo(kind, capfd):
    tower, inputs = _tiny(kind)
    tower.eval()
    names = steerable_params(tower, "qo")
    heads = locate_heads(tower)
    layers = n_attention_layers(tower)
    assert layers == 2 and {s.param for h in heads for s in h.slices("qo")} == set(names)
    assert any(n.endswith(".weight") and ("q_proj" in n or "query" in n) for n in names)
    params = dict(tower.named_parameters())
    proto = trace_onnx(tower, inputs, "out", {n: params[n].detach() for n in names})
    counts = check_fused(proto, layers)                      # one fused node per layer, no Softmax
    assert counts["MultiHeadAttention"] == 2 and counts["Softmax"] == 0
    inits = {t.name for t in proto.graph.initializer}
    assert {input_name(n) for n in names} <= inits
    assert [i.name for i in proto.graph.input] == list(inputs)  # steerable weights are not declared inputs
    feeds = {k: v.numpy() for k, v in inputs.items()}
    with torch.no_grad():
        ref = tower(*inputs.values()).numpy()
    capfd.readouterr()
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, feeds)[0]
    assert capfd.readouterr().err == ""
    assert np.abs(out - ref).max() / np.abs(ref).max() <= RTOL
    if "attention_mask" in inputs:        # the padding mask is an input of the graph, not traced into it
        other = {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}
        other["attention_mask"][0, 3:] = 0
        with torch.no_grad():
            ref_other = tower(*other.values()).numpy()
        out_other = sess.run(None, {k: v.numpy() for k, v in other.items()})[0]
        assert np.abs(out_other - ref_other).max() / np.abs(ref_other).max() <= RTOL
    # run-time steering: the weights as inputs of the session, fed changed q rows
    switch = ort.InferenceSession(steerable_as_inputs(proto, [input_name(n) for n in names]).SerializeToString(),
                                  providers=["CPUExecutionProvider"])
    new = _perturbed_qo(tower, names)
    with torch.no_grad():
        for n, t in new.items():
            params[n].copy_(t)
        ref2 = tower(*inputs.values()).numpy()
    out2 = switch.run(None, {**feeds, **{input_name(n): t.numpy() for n, t in new.items()}})[0]
    assert np.abs(ref2 - ref).max() / np.abs(ref).max() > 10 * RTOL
    assert np.abs(out2 - ref2).max() / np.abs(ref2).max() <= RTOL


def test_fused_swap_is_scoped_and_matches_eager():
    """The swap computes what the model's own attention computes (here against eager attention, not
    sdpa), and the model's attention implementation is restored after the block."""
    tower, inputs = _tiny("llama")
    tower.eval()
    tower.model.config._attn_implementation_internal = "eager"
    with torch.no_grad():
        ref = tower(*inputs.values())
        with fused_attention(tower):
            assert tower.model.config._attn_implementation == "edge_steer_fused"
            out = tower(*inputs.values())
    assert tower.model.config._attn_implementation == "eager"
    assert (out - ref).abs().max() / ref.abs().max() < 1e-5


def test_unfused_attention_is_refused():
    """Attention the swap does not reach (written out in a forward) fails the node count."""
    class Plain(nn.Module):
        def forward(self, x):
            return (x @ x.transpose(1, 2)).softmax(-1) @ x

    proto = trace_onnx(Plain().eval(), {"x": torch.randn(1, 5, 16)}, "out", {})
    with pytest.raises(ExportError, match="not fused"):
        check_fused(proto, 1)
    assert isinstance(proto, onnx.ModelProto)


def test_trace_leaves_the_model_in_its_mode():
    tower, inputs = _tiny("bert")
    tower.eval()
    trace_onnx(tower, inputs, "out", {})
    assert not any(m.training for m in tower.modules())


def test_tensorrt_rewrite_refuses_causal_attention_clearly():
    """The TensorRT plugin takes key-padding masks only: a causal LM's graph is refused, not mis-built."""
    from edge_steer.export import EngineError
    from edge_steer.export.tensorrt import rewrite_for_tensorrt
    tower, inputs = _tiny("llama")
    proto = trace_onnx(tower.eval(), inputs, "out", {})
    with pytest.raises(EngineError, match="attention_bias: a causal or 4-D mask"):
        rewrite_for_tensorrt(proto, [])
