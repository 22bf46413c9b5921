"""Kernels and TensorRT plugins for edge-steer's exported graphs, shipped inside the package (so an
installed wheel has them). This room knows nothing of edge_steer but the contract of the op it serves:
nothing here imports edge_steer. `fused_attention/` is the fused-attention op: contract + numpy
reference, Triton kernel, TensorRT plugin registration; `check_plugin.py` checks them."""
