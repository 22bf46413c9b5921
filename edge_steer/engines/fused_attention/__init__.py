"""edge-steer's fused-attention op for TensorRT: contract + numpy reference (`contract`), Triton
kernel (`kernel`, needs triton), TensorRT plugin registration (`plugin`, needs tensorrt). Only the
contract is imported here, so the package loads on any machine."""

from .contract import MASK_FILTER_VALUE, NAME, NAMESPACE, PLUGIN_ID, check_shapes, reference

__all__ = ["MASK_FILTER_VALUE", "NAME", "NAMESPACE", "PLUGIN_ID", "check_shapes", "reference"]
