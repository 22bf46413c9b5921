"""`edge-steer demo`: the main job end to end in simulation, stage by stage over library functions."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from edge_steer.cli._common import _demos, _fail, _load, console
from edge_steer.cli.demos import record_demos
from edge_steer.cli.export import run_export
from edge_steer.cli.steer import run_finetune, run_identify, run_report
from edge_steer.cli.train import run_eval


def demo(out: Path = typer.Option(Path("runs/demo"), help="working directory for the run"),
         task: str = typer.Option("purple_cylinder_in_yellow_bowl", help="held-out variant to adapt to"),
         episodes: int = typer.Option(10, min=1, help="few-shot demonstrations to record"),
         eval_episodes: int = typer.Option(10, min=1, help="closed-loop episodes before and after steering"),
         steps: int = typer.Option(300, min=1, help="steer fine-tuning steps"),
         model: Optional[Path] = typer.Option(None, help="base checkpoint (default: embedded model)"),
         serve_seconds: float = typer.Option(60.0, help="how long the served arm may take (0: skip serving)")) -> None:
    """The main job end to end in simulation: few-shot demos of a held-out variant -> identify ->
    steer fine-tune -> report -> ONNX export -> closed-loop success before/after -> serve over ZMQ."""
    import shutil
    from functools import partial

    from edge_steer.models import DEFAULT_MODEL_DIR, load_model
    from edge_steer.runtime.engine import load_engine
    from edge_steer.sim.env import EnvConfig
    from edge_steer.sim.tasks import TaskError, get_task
    from edge_steer.steering.finetune import FinetuneConfig, with_train
    from edge_steer.steering.identify import IdentifyConfig, selected_heads

    try:
        t = get_task(task)
    except TaskError as e:
        _fail(str(e))
    if out.exists():
        shutil.rmtree(out)
    base = model or DEFAULT_MODEL_DIR
    _load(base)
    demos = out / "demos"
    console.rule(f"1/7 record {episodes} demos of {task} ({t.split}, {t.factor or 'base'} variation)")
    record_demos(task, [task], episodes, 0, demos, EnvConfig(image_size=96))
    console.rule("2/7 the base model on the new task (zero-shot)")
    before = run_eval(partial(load_model, base), [t], eval_episodes, 0, 2, out / "eval_before.json")
    console.rule("3/7 identify the heads that mediate it")
    m = _load(base)
    doc = run_identify(m, _demos(demos, m), IdentifyConfig(method="attribution", top_k=6, exact=False, seed=0),
                       out / "heads.json", demos)
    console.rule("4/7 fine-tune only those heads")
    m = _load(base)   # each stage starts from the base checkpoint, as each command does
    cfg = with_train(FinetuneConfig(method="steer", slices="qo"), steps=steps, batch_size=32, lr=1e-3, seed=0,
                     deterministic=False)
    run_finetune(m, _demos(demos, m), cfg, out / "steer", selected_heads(doc, m), doc)
    m = _load(base)
    run_report(doc, m, _demos(demos, m), out / "report", frames=3)
    console.rule("5/7 export base + steering delta to ONNX")
    run_export(_load(base), out / "steered.onnx", out / "steer" / "steering.safetensors", "onnx", steerable="qo")
    console.rule("6/7 the exported, steered engine on the new task")
    after = run_eval(partial(load_engine, out / "steered.onnx"), [t], eval_episodes, 0, 2, out / "eval_after.json")
    served = _demo_serve(out, t, out / "steered.onnx", serve_seconds) if serve_seconds > 0 else None
    console.rule("summary")
    b, a = before[0], after[0]
    console.print(f"{task}: success {b['successes']}/{b['episodes']} zero-shot -> {a['successes']}/{a['episodes']} "
                  f"after steering (ONNX engine); report: {out / 'report' / 'report.md'}")
    if served is not None:
        console.print(served)


def _demo_serve(out: Path, task, engine: Path, seconds: float) -> str:
    """Start `edge-steer serve` on the steered engine, instruct it over ZMQ, report outcome and timing."""
    from edge_steer.runtime.launch import ServeProcess

    console.rule("7/7 serve the engine in sim and send the instruction over ZMQ")
    serve = ServeProcess(out, f'[engine]\nbackend = "onnxruntime"\npath = "{engine}"\n[robot]\ntask = "{task.name}"\n')
    try:
        with serve:
            client = serve.client
            client.instruct(task.instruction)
            t0 = time.time()
            st = client.status()
            while st["state"] == "RUNNING" and time.time() - t0 < seconds:
                time.sleep(0.5)
                st = client.status()
    except (RuntimeError, TimeoutError) as e:
        return f"serve failed: {e}; see {serve.log_path}"
    (out / "serve_status.json").write_text(json.dumps(st, indent=1, default=str))
    loop = st.get("setpoint_loop", {})
    ok = (st.get("sim") or {}).get("success")
    return (f"served: '{task.instruction}' -> {'success' if ok else 'no success'} after {time.time() - t0:.1f} s "
            f"(state {st['state']}); setpoint loop: " + json.dumps({k: v for k, v in loop.items()
                                                                   if not isinstance(v, (list, dict))})
            + f"; full status: {out / 'serve_status.json'}")

