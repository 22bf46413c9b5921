"""Build/test script for the fused-attention plugin. Exit status 0 when every check passes.

    TRITON_INTERPRET=1 python -m edge_steer.engines.check_plugin --interpret   # CPU: the Triton kernel, interpreted
    python -m edge_steer.engines.check_plugin --gpu                  # GPU: the compiled kernel, fp32 (ieee, tf32)/fp16/bf16
    python -m edge_steer.engines.check_plugin --trt [--bench]        # GPU + TensorRT: a plan with the plugin

Every check compares against `fused_attention.contract.reference`. `--bench` times the plugin against
TensorRT's own attention (the same op written as MatMul-Softmax-MatMul, which TensorRT fuses itself).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))   # run as a script or as a module: the same package

from fused_attention import NAME, NAMESPACE, reference  # noqa: E402

CASES = [(1, 37, 4, 8), (2, 45, 2, 16), (1, 99, 8, 16)]     # (batch, seq, heads, head_dim); 99 = EdgeVLA


def _case(b, s, h, d, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(b, s, h * d)).astype(np.float32) for _ in range(3))
    mask = np.ones((b, s), np.int32)
    mask[:, s // 3: s // 2] = 0
    return q, k, v, mask


def _err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def check_kernel(device: str) -> bool:
    import torch

    from fused_attention.kernel import TOLERANCE, launch
    ok = True
    # (dtype, tl.dot precision for fp32, tolerance); the interpreter computes in numpy fp32 whatever is asked
    dtypes = [(torch.float32, "ieee", 1e-5 if device == "cpu" else TOLERANCE["ieee"])]
    if device == "cuda":
        dtypes += [(torch.float32, "tf32", TOLERANCE["tf32"]), (torch.float16, "ieee", 5e-3),
                   (torch.bfloat16, "ieee", 3e-2)]
    cases = CASES if device == "cuda" else CASES[:2]       # the interpreter runs programs one by one
    for i, (b, s, h, d) in enumerate(cases):
        q, k, v, mask = _case(b, s, h, d, i)
        ref = reference(q, k, v, mask, h, d ** -0.5)
        for dtype, precision, tol in dtypes:
            t = [torch.from_numpy(x).to(device=device, dtype=dtype) for x in (q, k, v)]
            out = torch.empty_like(t[0])
            launch(*t, torch.from_numpy(mask).to(device), out, h, d ** -0.5, 16, 16, precision=precision)
            e = _err(out.float().cpu().numpy(), ref)
            ok &= e < tol
            print(f"kernel {device} {str(dtype):15s} {precision:4s} B={b} S={s} H={h} D={d}: rel err {e:.2e} "
                  f"(tol {tol:.0e})")
    return ok


def _one_node_onnx(b, s, h, d, plugin: bool):
    import onnx
    from onnx import TensorProto, helper
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [b, s, h * d]) for n in "qkv"]
    vi.append(helper.make_tensor_value_info("m", TensorProto.INT32, [b, s]))
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [b, s, h * d])
    if plugin:
        nodes = [helper.make_node(NAME, ["q", "k", "v", "m"], ["o"], num_heads=h, scale=d ** -0.5,
                                  plugin_namespace=NAMESPACE)]
    else:   # the same op unfused, for TensorRT's own attention fusion
        c = lambda name, arr: helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(arr, name))  # noqa: E731
        nodes = [c("shape", np.array([b, s, h, d], np.int64)), c("oshape", np.array([b, s, h * d], np.int64)),
                 c("scale", np.array(d ** -0.5, np.float32)), c("neg", np.array(-10000.0, np.float32)),
                 c("zero", np.array(0.0, np.float32))]
        for n in "qkv":
            nodes += [helper.make_node("Reshape", [n, "shape"], [n + "4"]),
                      helper.make_node("Transpose", [n + "4"], [n + "h"], perm=[0, 2, 1, 3])]
        nodes += [helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 1, 3, 2]),
                  helper.make_node("MatMul", ["qh", "kt"], ["s0"]), helper.make_node("Mul", ["s0", "scale"], ["s1"]),
                  helper.make_node("Cast", ["m"], ["mb"], to=TensorProto.BOOL),
                  helper.make_node("Where", ["mb", "zero", "neg"], ["bias2"]),
                  helper.make_node("Unsqueeze", ["bias2", "axes"], ["bias"]),
                  c("axes", np.array([1, 2], np.int64)),
                  helper.make_node("Add", ["s1", "bias"], ["s2"]), helper.make_node("Softmax", ["s2"], ["w"], axis=-1),
                  helper.make_node("MatMul", ["w", "vh"], ["oh"]),
                  helper.make_node("Transpose", ["oh"], ["ot"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["ot", "oshape"], ["o"])]
        # Constant "axes" must precede its use
        nodes.sort(key=lambda n: 0 if n.op_type == "Constant" else 1)
    g = helper.make_graph(nodes, "attention", vi, [out])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def check_trt(bench: bool) -> bool:
    import tensorrt as trt
    import torch

    from fused_attention.plugin import register
    register()
    ok = True
    for i, (b, s, h, d) in enumerate(CASES):
        q, k, v, mask = _case(b, s, h, d, i)
        ref = reference(q, k, v, mask, h, d ** -0.5)
        timings = {}
        for plugin in (True, False):
            for fp16 in (False, True):
                logger = trt.Logger(trt.Logger.WARNING)
                builder = trt.Builder(logger)
                network = builder.create_network(0)
                parser = trt.OnnxParser(network, logger)
                if not parser.parse(_one_node_onnx(b, s, h, d, plugin).SerializeToString()):
                    print("parse failed:", [str(parser.get_error(j)) for j in range(parser.num_errors)])
                    return False
                config = builder.create_builder_config()
                if fp16:
                    config.set_flag(trt.BuilderFlag.FP16)
                engine = trt.Runtime(logger).deserialize_cuda_engine(builder.build_serialized_network(network, config))
                ctx = engine.create_execution_context()
                dev = {n: torch.from_numpy(x).cuda() for n, x in zip("qkvm", (q, k, v, mask))}
                dev["o"] = torch.empty(b, s, h * d, device="cuda")
                for n, t in dev.items():
                    ctx.set_tensor_address(n, t.data_ptr())
                stream = torch.cuda.Stream()
                ctx.execute_async_v3(stream.cuda_stream)
                stream.synchronize()
                e = _err(dev["o"].cpu().numpy(), ref)
                tol = 2e-2 if fp16 else 1e-4
                ok &= e < tol
                label = f"{'plugin' if plugin else 'trt-own'} {'fp16' if fp16 else 'fp32'}"
                if bench:
                    for _ in range(20):
                        ctx.execute_async_v3(stream.cuda_stream)
                    stream.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(200):
                        ctx.execute_async_v3(stream.cuda_stream)
                    stream.synchronize()
                    timings[label] = (time.perf_counter() - t0) / 200 * 1e6
                print(f"trt {label} B={b} S={s} H={h} D={d}: rel err {e:.2e} (tol {tol:.0e})"
                      + (f", {timings[label]:.1f} us" if bench else ""))
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interpret", action="store_true", help="Triton interpreter on the CPU (set TRITON_INTERPRET=1)")
    ap.add_argument("--gpu", action="store_true", help="compiled kernel on the GPU")
    ap.add_argument("--trt", action="store_true", help="TensorRT plans with the plugin (and TensorRT's own attention)")
    ap.add_argument("--bench", action="store_true", help="with --trt: time plugin vs TensorRT's own attention")
    a = ap.parse_args()
    if a.interpret and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--interpret needs TRITON_INTERPRET=1 in the environment (read when triton is imported)")
    ok = True
    if a.interpret:
        ok &= check_kernel("cpu")
    if a.gpu:
        ok &= check_kernel("cuda")
    if a.trt:
        ok &= check_trt(a.bench)
    if not (a.interpret or a.gpu or a.trt):
        ap.error("choose --interpret, --gpu and/or --trt")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
