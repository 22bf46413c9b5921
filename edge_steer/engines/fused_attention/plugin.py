"""Registers `edge_steer::fused_attention` with TensorRT 10's Python plugin API (`tensorrt.plugin`).

The ONNX parser maps a node whose op type is `fused_attention` and whose string attribute
`plugin_namespace` is `edge_steer` to this plugin; its other attributes (num_heads, scale) become
the plugin's. `register()` must run before a network is parsed *and* before a plan that contains
the plugin is deserialized (the implementation is a Python callback: the plan is served from Python).
"""

from __future__ import annotations

from typing import List, Tuple

from .contract import PLUGIN_ID

_registered = False

# (q, k, v, key_mask, out): the three float I/Os and the output share one dtype; the mask is int32
_COMBINATIONS = ("FP32, FP32, FP32, INT32, FP32", "FP16, FP16, FP16, INT32, FP16", "BF16, BF16, BF16, INT32, BF16")


def register() -> None:
    """Idempotent: TensorRT refuses a second registration of the same plugin id."""
    global _registered
    if _registered:
        return
    import tensorrt.plugin as trtp
    import torch

    @trtp.register(PLUGIN_ID)
    def _desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_mask: trtp.TensorDesc,
              num_heads: int, scale: float) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(PLUGIN_ID)
    def _autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_mask: trtp.TensorDesc,
                  num_heads: int, scale: float, outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(c) for c in _COMBINATIONS]

    @trtp.impl(PLUGIN_ID)
    def _impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, key_mask: trtp.Tensor, num_heads: int,
              scale: float, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        from .kernel import launch
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            launch(torch.as_tensor(q, device="cuda"), torch.as_tensor(k, device="cuda"),
                   torch.as_tensor(v, device="cuda"), torch.as_tensor(key_mask, device="cuda"),
                   torch.as_tensor(outputs[0], device="cuda"), num_heads, scale)

    _registered = True
