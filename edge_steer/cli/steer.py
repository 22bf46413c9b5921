"""`edge-steer identify | finetune | apply | report`: find the heads, steer them, merge, explain."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from edge_steer.cli._common import _demos, _fail, _load, _progress, console


def identify_cmd(model: Optional[Path] = typer.Option(None, help="checkpoint directory (default: embedded model)"),
                 demos: Path = typer.Option(..., help="few-shot demos of the new task"),
                 out: Path = typer.Option(Path("heads.json"), help="where to write the heads file"),
                 method: str = typer.Option("attribution", help="ranking: attribution | ablation | patching | probe"),
                 top_k: int = typer.Option(6, min=1), coverage: Optional[float] = typer.Option(
                     None, help="instead of top-k: the fewest heads holding this share of the total effect"),
                 max_frames: int = typer.Option(256, min=8), baseline: Optional[Path] = typer.Option(
                     None, help="frames of other tasks for the mean-ablation baseline (default: the demos)"),
                 probe: str = typer.Option("ridge", help="ridge | knn"),
                 exact: bool = typer.Option(True, help="also run exact ablation/patching and report agreement"),
                 seed: int = typer.Option(0)) -> None:
    """Score every attention head on the demos and select the ones that mediate the task."""
    from edge_steer.steering.identify import IdentifyConfig, IdentifyError

    m = _load(model)
    ds = _demos(demos, m)
    try:
        cfg = IdentifyConfig(method=method, top_k=top_k, coverage=coverage, max_frames=max_frames, probe=probe,
                             exact=exact, seed=seed)
    except IdentifyError as e:
        _fail(str(e))
    base_ds = _demos(baseline, m) if baseline else None
    run_identify(m, ds, cfg, out, demos, base_ds)


def run_identify(model, ds, cfg, out: Path, demos: Path, baseline=None) -> dict:
    """identify with a progress line, heads.json written to `out`, the selected heads printed; the document."""
    from edge_steer.data import DatasetError
    from edge_steer.steering.identify import IdentifyError, demo_probe_sets, identify

    try:
        ps, base_ps = demo_probe_sets(model, ds, cfg, baseline)
        with _progress() as prog:
            bar = prog.add_task("identify", total=None)
            doc = identify(model, ps, cfg, base_ps, demos={"path": str(demos)},
                           progress=lambda msg: prog.update(bar, description=f"identify: {msg}"))
    except (IdentifyError, DatasetError) as e:   # DatasetError: a damaged frame past the first ones
        _fail(str(e))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    table = Table("head", "score", "factors", title=f"selected heads ({cfg.method}, {len(ps)} frames)")
    for s in doc["selected"]:
        table.add_row(s["head"], f"{s['score']:.4g}", ", ".join(s["factors"]) or "-")
    console.print(table)
    if doc["agreement"]:
        a = doc["agreement"]["ablation"]
        t = doc["timing"]
        console.print(f"attribution vs exact ablation: Spearman {a['spearman']:.2f}, top-{a['k']} overlap "
                      f"{a['topk_overlap']:.2f}; passes {t['attribution_passes']:.0f} vs exhaustive "
                      f"{t['exhaustive_passes']:.0f}")
    console.print(f"heads file: {out}")
    return doc


def finetune_cmd(model: Optional[Path] = typer.Option(None, help="base checkpoint (default: embedded model)"),
                 demos: Path = typer.Option(..., help="few-shot demos of the new task"),
                 method: str = typer.Option("steer", help="steer | lora | full"),
                 heads: Optional[Path] = typer.Option(None, help="heads.json from identify (steer)"),
                 out: Path = typer.Option(..., help="run directory: model/, steering.safetensors, finetune.json"),
                 slices: str = typer.Option("qo", help="steer: which of q, k, v, o slices train"),
                 whole: str = typer.Option("", help="steer: modules also trained whole, comma-separated (e.g. stem.0)"),
                 lora_rank: int = typer.Option(16, min=1), steps: int = typer.Option(300, min=1),
                 batch_size: int = typer.Option(32, min=1), lr: float = typer.Option(1e-3),
                 seed: int = typer.Option(0), deterministic: bool = typer.Option(False),
                 resume: bool = typer.Option(False, help="continue from a checkpoint in OUT")) -> None:
    """Fine-tune on few-shot demos: only the selected heads (steer), LoRA, or every weight (full)."""
    from edge_steer.steering.finetune import FinetuneConfig, FinetuneError, with_train
    from edge_steer.steering.identify import IdentifyError, selected_heads

    m = _load(model)
    ds = _demos(demos, m)
    try:
        cfg = with_train(FinetuneConfig(method=method, slices=slices, whole=tuple(w for w in whole.split(",") if w),
                                        lora_rank=lora_rank), steps=steps,
                         batch_size=batch_size, lr=lr, seed=seed, deterministic=deterministic)
        doc, refs = None, None
        if method == "steer":
            if heads is None or not heads.is_file():
                _fail("steer fine-tuning needs --heads (a heads.json written by `edge-steer identify`)")
            doc = json.loads(heads.read_text())
            refs = selected_heads(doc, m)
    except (FinetuneError, IdentifyError, json.JSONDecodeError) as e:
        _fail(str(e))
    run_finetune(m, ds, cfg, out, refs, doc, resume)


def run_finetune(model, ds, cfg, out: Path, heads=None, heads_doc: Optional[dict] = None, resume: bool = False):
    """finetune, its result saved into `out` and summed up in one line; the FinetuneResult."""
    from edge_steer.data import DatasetError
    from edge_steer.steering.finetune import FinetuneError, finetune, save_result
    from edge_steer.steering.identify import IdentifyError

    try:
        res = finetune(model, ds, cfg, out, heads=heads, heads_doc=heads_doc, resume=resume)
    except (FinetuneError, IdentifyError, DatasetError, FloatingPointError) as e:
        _fail(str(e))
    from edge_steer.models.distributed import is_main
    if not is_main():        # under torchrun every process holds the same result: the first one writes it
        return res
    paths = save_result(res, out)
    console.print(f"{cfg.method}: {res.trainable_params:,} trainable parameters, {res.train.steps} steps, final loss "
                  f"{res.train.final_loss:.4f}, {res.train.seconds:.0f} s; " + ", ".join(f"{k}: {v}" for k, v in paths.items()))
    return res


def apply_cmd(steering: Path = typer.Option(..., help="steering.safetensors from `finetune --method steer`"),
              out: Path = typer.Option(..., help="where to write the steered checkpoint"),
              model: Optional[Path] = typer.Option(None, help="base checkpoint (default: embedded model)")) -> None:
    """Merge a steering delta into its base model (refuses any other base model)."""
    from edge_steer.steering.delta import DeltaError, SteeringDelta

    m = _load(model)
    try:
        delta = SteeringDelta.load(steering)
        delta.apply_(m)
    except DeltaError as e:
        _fail(str(e))
    m.save_pretrained(out)
    console.print(f"applied {delta.num_values:,} steered values ({len(delta.tensors)} slices); model: {out}")


def report_cmd(heads: Path = typer.Option(..., help="heads.json written by `edge-steer identify`"),
               model: Optional[Path] = typer.Option(None, help="the checkpoint identified (default: embedded model)"),
               demos: Path = typer.Option(..., help="demos to draw the sample frames from"),
               out: Path = typer.Option(..., help="report directory: report.md, heatmap.png, attention_<head>.png"),
               frames: int = typer.Option(3, min=1, max=8, help="sample frames per attention map")) -> None:
    """Explain identified heads: effect heatmaps per factor, the top heads' attention on demo frames, a summary."""
    try:
        doc = json.loads(heads.read_text())
    except (OSError, json.JSONDecodeError) as e:
        _fail(f"cannot read heads file {heads}: {e}")
    m = _load(model)
    ds = _demos(demos, m)
    run_report(doc, m, ds, out, frames)


def run_report(doc: dict, model, ds, out: Path, frames: int) -> Path:
    """write_report under a status line; the report's path, printed."""
    from edge_steer.data import DatasetError
    from edge_steer.steering.identify import IdentifyError
    from edge_steer.steering.report import ReportError, write_report

    try:
        with console.status("drawing the report"):
            path = write_report(doc, model, ds, out, n_frames=frames)
    except (IdentifyError, ReportError, DatasetError, KeyError) as e:
        _fail(str(e))
    console.print(f"report: {path}")
    return path
