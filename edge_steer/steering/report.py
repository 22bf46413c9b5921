"""Explain identified heads to a person: where the effect sits, what the top heads look at, a summary.

`write_report(heads_doc, model, dataset, out_dir)` writes

* `heatmap.png`      layer x head maps of every score in heads.json (mean ablation, each factor's patching
                     or its attribution estimate, probe R^2) with the selected heads outlined;
* `attention_<head>.png` for the top selected heads: the attention of the decision tokens (the action
                     queries, averaged over the chunk) over each camera's patches, laid on the image, and
                     over the instruction tokens and the state token, on a few demo frames;
* `report.md`        a short summary that links both.

The figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly, so the report never
touches pyplot's global backend or state (it runs inside the CLI, tests and notebooks alike).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_steer.models.heads import HeadRef
from edge_steer.steering.identify import FACTORS, selected_heads

MAX_ATTENTION_HEADS = 4


class ReportError(ValueError):
    pass


# ------------------------------------------------------------------------------------------------
# Scores out of heads.json
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Panel:
    title: str
    values: np.ndarray      # (n_layers, n_heads), NaN where the heads file has no entry
    kind: str               # "effect" (action-error change) | "r2" (probe)


def _grid(raw: Any, shape: tuple[int, int], name: str) -> np.ndarray | None:
    """A nested list with null entries -> float array with NaN; None when the score is absent."""
    if raw is None:
        return None
    rows = [[np.nan if v is None else float(v) for v in row] for row in raw]
    if len(rows) != shape[0] or any(len(r) != shape[1] for r in rows):
        raise ReportError(f"heads file score {name!r} is not {shape[0]} layers x {shape[1]} heads")
    return np.asarray(rows, dtype=np.float64).reshape(shape)


def score_panels(doc: dict[str, Any]) -> list[Panel]:
    """One panel per score the heads file holds; a factor shows exact patching where it was run,
    else its attribution estimate (the title says which)."""
    shape = (int(doc["n_layers"]), int(doc["n_heads"]))
    scores = doc.get("scores") or {}
    patching, attribution = scores.get("patching") or {}, scores.get("attribution") or {}
    panels = []
    ablation = _grid(scores.get("ablation"), shape, "ablation")
    if ablation is not None:
        panels.append(Panel("mean ablation", ablation, "effect"))
    elif (est := _grid(attribution.get("ablation"), shape, "attribution.ablation")) is not None:
        panels.append(Panel("mean ablation (attribution est.)", est, "effect"))
    for f in FACTORS:
        if (exact := _grid(patching.get(f), shape, f"patching.{f}")) is not None:
            panels.append(Panel(f"{f} patching", exact, "effect"))
        elif (est := _grid(attribution.get(f), shape, f"attribution.{f}")) is not None:
            panels.append(Panel(f"{f} (attribution est.)", est, "effect"))
    if (probe := _grid(scores.get("probe"), shape, "probe")) is not None:
        panels.append(Panel("probe R²", probe, "r2"))
    if not panels:
        raise ReportError("the heads file holds no scores to plot")
    return panels


def factor_shares(doc: dict[str, Any], heads: Sequence[HeadRef] | None = None) -> tuple[dict[str, float], bool]:
    """Each factor's share of the summed positive per-factor effect (over `heads`, or all heads), and
    whether the effects are exact (patching) rather than attribution estimates."""
    shape = (int(doc["n_layers"]), int(doc["n_heads"]))
    scores = doc.get("scores") or {}
    exact = bool(scores.get("patching"))
    src = scores.get("patching") if exact else {
        f: v for f, v in (scores.get("attribution") or {}).items() if f in FACTORS}
    totals = {}
    for f, raw in (src or {}).items():
        g = _grid(raw, shape, f)
        if g is None:
            continue
        g = np.nan_to_num(np.clip(g, 0, None))
        totals[f] = float(sum(g[h.layer, h.head] for h in heads)) if heads is not None else float(g.sum())
    whole = sum(totals.values())
    return {f: (v / whole if whole > 0 else 0.0) for f, v in totals.items()}, exact


# ------------------------------------------------------------------------------------------------
# Attention of the decision tokens
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def decision_attention(model, inputs: dict[str, torch.Tensor], heads: Sequence[HeadRef]) -> dict[HeadRef, np.ndarray]:
    """(B, T) per head: the attention of the decision tokens over every key, averaged over the chunk
    (each row sums to 1), from the model's own `attention_maps` (one forward)."""
    maps = model.attention_maps(inputs, {h.layer for h in heads})
    dec = model.decision_slice
    return {h: maps[h.layer][:, h.head, dec].mean(1).float().numpy() for h in heads}


def instruction_tokens(encoder, text: str, n: int) -> list[str]:
    """Labels of the instruction's n token positions: the encoder's tokens when it can give them,
    else positions (a missing tokenizer must not cost the whole report)."""
    try:
        if callable(tokens := getattr(encoder, "tokens", None)):
            toks = [str(t) for t in tokens(text)]
        else:
            # InstructionEncoder has no public token list yet: its own tokenizer, called the way it
            # encodes (stripped, lower-cased, truncated to the model's token budget)
            tok = encoder._tokenizer
            ids = tok(text.strip().lower(), truncation=True, max_length=n)["input_ids"]
            toks = tok.convert_ids_to_tokens(ids)
    except Exception:  # noqa: BLE001 - labels are cosmetic; fall back to positions
        toks = []
    return [toks[i] if i < len(toks) else f"#{i}" for i in range(n)]


def _pick_frames(dataset, tasks: Sequence[str], n: int, chunk: int) -> dict[str, Any]:
    """n frames spread over the demos, from the identified task's episodes where the demos hold them."""
    if len(dataset) == 0:
        raise ReportError("the demos hold no frames to draw attention maps on")
    pool = np.arange(len(dataset))
    if tasks:
        names = np.asarray(dataset.sample(pool, chunk=1, keys=[])["task"])
        own = pool[np.isin(names, list(tasks))]
        pool = own if len(own) else pool
    idx = pool[np.unique(np.linspace(0, len(pool) - 1, min(n, len(pool))).round().astype(np.int64))]
    return dataset.sample(idx, chunk=chunk)


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_heatmaps(panels: Sequence[Panel], chosen: Sequence[HeadRef], path: Path) -> Path:
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    n_layers, n_heads = panels[0].values.shape
    effects = [p for p in panels if p.kind == "effect"]
    r2 = [p for p in panels if p.kind == "r2"]
    # one symmetric scale for every effect panel, so factors compare at a glance
    lim = max((np.nanmax(np.abs(p.values), initial=0.0) for p in effects), default=0.0) or 1.0
    r2_lo = min(0.0, min((np.nanmin(p.values, initial=0.0) for p in r2), default=0.0))
    cell = 0.32
    fig = _figure(max(6.0, len(panels) * (n_heads * cell + 0.9) + 0.6), n_layers * cell + 2.4)
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    ims = {}
    annotate = n_layers * n_heads <= 64
    for ax, p in zip(axes, panels):
        # grey: heads the file has no score for
        cmap = colormaps["RdBu_r" if p.kind == "effect" else "viridis"].with_extremes(bad="#d0d0d0")
        vmin, vmax = (-lim, lim) if p.kind == "effect" else (r2_lo, 1.0)
        ims[p.kind] = ax.imshow(np.ma.masked_invalid(p.values), cmap=cmap, vmin=vmin, vmax=vmax,
                                     aspect="equal", origin="upper", interpolation="nearest")
        for h in chosen:
            ax.add_patch(Rectangle((h.head - 0.5, h.layer - 0.5), 1, 1, fill=False, edgecolor="black", lw=2.2))
        if annotate:
            for (layer, head), v in np.ndenumerate(p.values):
                if np.isfinite(v):
                    txt = f"{v:.2f}" if p.kind == "r2" else f"{v:.2g}"
                    ax.text(head, layer, txt, ha="center", va="center", fontsize=5,
                            color="white" if abs(v - (vmin + vmax) / 2) > 0.6 * (vmax - vmin) / 2 else "black")
        ax.set_title(p.title, fontsize=9)
        ax.set_xlabel("head")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
    axes[0].set_ylabel("layer")
    if "effect" in ims:
        fig.colorbar(ims["effect"], ax=[a for a, p in zip(axes, panels) if p.kind == "effect"], location="bottom",
                     shrink=0.6, aspect=40, label="effect of replacing the head, normalised action units (exact: L1 error increase; "
                           "attribution est.: RMS action shift)")
    if "r2" in ims:
        fig.colorbar(ims["r2"], ax=[a for a, p in zip(axes, panels) if p.kind == "r2"], location="bottom",
                     shrink=0.9, aspect=20, label="probe R² (leave-one-episode-out)")
    fig.suptitle(f"Head effects, {n_layers} layers x {n_heads} heads (selected heads outlined)", fontsize=10)
    fig.savefig(path)
    return path


def _overlay(image: np.ndarray, grid: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The patch grid blown up to the image (nearest: a patch is one token, smoothing would invent
    detail) and blended over it; grid already scaled to [0, 1]."""
    from matplotlib import colormaps

    h, w = image.shape[:2]
    g = grid.shape[0]
    rows = np.minimum(np.arange(h) * g // h, g - 1)
    cols = np.minimum(np.arange(w) * g // w, g - 1)
    heat = colormaps["inferno"](grid[rows][:, cols])[..., :3]
    return (1 - alpha) * image.astype(np.float64) / 255.0 + alpha * heat


def plot_attention(head: HeadRef, weights: np.ndarray, frames: dict[str, Any], model, lang_mask: np.ndarray,
                   path: Path) -> Path:
    """Rows: frames; columns: one per camera (attention over its patches on the image), then the
    instruction and state tokens as bars."""
    c = model.config
    layout = model.token_layout()
    # a camera's tokens: a square grid of patches, then any extra tokens (EdgeVLA's keypoint token)
    g = math.isqrt(layout[f"camera:{c.cameras[0]}"].stop - layout[f"camera:{c.cameras[0]}"].start)
    n, n_cam = weights.shape[0], len(c.cameras)
    fig = _figure(3.0 * n_cam + 5.0, 2.9 * n)
    axes = fig.subplots(n, n_cam + 1, squeeze=False, width_ratios=[1] * n_cam + [1.8])
    for i in range(n):
        w = weights[i]
        # a camera's tokens are its g x g patches, then its keypoint token if the model has one
        cams = [w[layout[f"camera:{cam}"]] for cam in c.cameras]
        patches, keypoints = [a[: g * g] for a in cams], [a[g * g:] for a in cams]
        # one scale over the frame's cameras, floored at uniform attention so that a head that
        # ignores the images does not light up its (tiny) strongest patch
        top = max(max(float(a.max()) for a in patches), 1.0 / max(int((w > 0).sum()), 1))
        for j, cam in enumerate(c.cameras):
            ax = axes[i, j]
            ax.imshow(_overlay(frames[f"observation.images.{cam}"][i], (patches[j] / top).reshape(g, g)))
            ax.set_title(f"{cam}: {cams[j].sum():.0%} of attention", fontsize=8)
            ax.set_axis_off()
        ax = axes[i, -1]
        real = np.flatnonzero(lang_mask[i])
        text = str(frames["task"][i])
        labels = instruction_tokens(model.encoder, text, c.max_lang_tokens)
        kp = np.concatenate(keypoints)
        vals = np.concatenate([w[layout["instruction"]][real], w[layout["state"]], kp])
        colors = ["tab:blue"] * len(real) + ["tab:orange"] + ["tab:green"] * len(kp)
        names = [labels[k] for k in real] + ["[state]"] + [f"[{cam} keypoints]" for cam, a in zip(c.cameras, keypoints) if len(a)]
        ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("attention", fontsize=8)
        rest = float(w[layout["decision"]].sum())
        ax.set_title(f"“{text}” (ep {int(frames['episode_index'][i])}, t={int(frames['frame_index'][i])}); "
                     f"queries themselves: {rest:.0%}", fontsize=8)
    fig.suptitle(f"{head}: attention of the action queries, mean over the chunk (brighter patch = more)", fontsize=10)
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------------------------
# The summary
# ------------------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str = ".3g") -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def _markdown(doc: dict[str, Any], panels: Sequence[Panel], chosen: Sequence[HeadRef], figures: Sequence[Path]) -> str:
    demos, timing, cfg = doc.get("demos") or {}, doc.get("timing") or {}, doc.get("config") or {}
    tasks = demos.get("tasks") or []
    lines = [f"# Head report: {', '.join(tasks) or 'demos'}", ""]
    gqa = doc.get("n_kv_heads")
    lines.append(f"- **Model** `{str(doc.get('model_fingerprint'))[:12]}`: {doc['n_layers']} layers x "
                 f"{doc['n_heads']} heads" + (f" ({gqa} key/value heads)" if gqa and gqa != doc["n_heads"] else ""))
    where = f" from `{demos['path']}`" if demos.get("path") else ""
    n_eps = len(demos.get("episodes") or [])
    lines.append(f"- **Demos**{where}: {demos.get('frames', '?')} frames of {n_eps} episodes")
    k = int(cfg.get("top_k", len(chosen)))
    if cfg.get("coverage"):
        how = f"the fewest heads covering {cfg['coverage']:.0%} of the effect"
    else:
        how = f"top {k}" + (" requested, only heads with a positive effect qualify" if len(chosen) < k else "")
    lines.append(f"- **Method**: heads ranked by {doc.get('method')}; {len(chosen)} selected ({how}); factors "
                 f"{', '.join(doc.get('factors') or []) or 'none'}")
    lines.append(f"- **Clean action error**: {_fmt(doc.get('clean_error'), '.4f')} (normalised L1 of the chunk)")

    lines += ["", "## Selected heads", "",
              "| # | head | score | factors | " + " | ".join(p.title for p in panels) + " |",
              "|---|---|---|---|" + "---|" * len(panels)]
    for i, s in enumerate(doc["selected"], 1):
        h = HeadRef(s["layer"], s["index"])
        vals = " | ".join(_fmt(float(p.values[h.layer, h.head])) for p in panels)
        lines.append(f"| {i} | {h} | {_fmt(s.get('score'))} | {', '.join(s.get('factors') or []) or '–'} | {vals} |")

    shares_all, exact = factor_shares(doc)
    if shares_all:
        shares_sel, _ = factor_shares(doc, chosen)
        src = "exact patching" if exact else "attribution estimates"
        lines += ["", f"## Where the effect goes ({src}, positive effects)", "",
                  "| factor | share, all heads | share, selected heads |", "|---|---|---|"]
        lines += [f"| {f} | {shares_all[f]:.0%} | {shares_sel.get(f, 0.0):.0%} |" for f in shares_all]

    if agree := doc.get("agreement"):
        lines += ["", "## Attribution vs exact scores", "", "| score | Spearman ρ | top-k overlap | k |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {_fmt(a.get('spearman'), '.2f')} | {_fmt(a.get('topk_overlap'), '.2f')} | "
                  f"{a.get('k', '–')} |" for name, a in agree.items()]

    if timing:
        lines += ["", "## Cost", "", "| step | wall time (s) | forward passes |", "|---|---|---|"]
        rows = (("attribution", "attribution_s", "attribution_passes"), ("exact (batched)", "exact_s", "exact_passes"),
                ("exhaustive, one head per forward", None, "exhaustive_passes"), ("probe", "probe_s", None),
                ("total", "total_s", None))
        for name, t, p in rows:
            if (t and t in timing) or (p and p in timing):
                secs = _fmt(timing.get(t), ".2f") if t else "–"
                passes = _fmt(timing.get(p), ".0f") if p else "–"
                lines.append(f"| {name} | {secs} | {passes} |")
        if timing.get("attribution_passes") and timing.get("exhaustive_passes"):
            lines.append(f"\nAttribution needs {timing['exhaustive_passes'] / timing['attribution_passes']:.1f}x "
                         "fewer passes than patching one head per forward.")

    lines += ["", "## Figures", "", f"![head effects]({figures[0].name})", ""]
    for f in figures[1:]:
        lines += [f"![{f.stem}]({f.name})", ""]
    lines.append("Heatmaps: red = ablating/patching the head raises the action error (it matters), blue = lowers "
                 "it, grey = not scored. Attention maps: where the action queries of the head look, per camera "
                 "(share of attention in each title) and over the instruction tokens and the state token.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# The whole report
# ------------------------------------------------------------------------------------------------
def write_report(heads_doc: dict[str, Any], model, dataset, out_dir: Path, n_frames: int = 3) -> Path:
    """Heatmaps, attention maps of the top selected heads on `n_frames` demo frames, and report.md
    (returned). Refuses a heads file identified on another model."""
    chosen = selected_heads(heads_doc, model)      # IdentifyError for another model's heads file
    if n_frames < 1:
        raise ReportError("n_frames must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    panels = score_panels(heads_doc)
    figures = [plot_heatmaps(panels, chosen, out_dir / "heatmap.png")]

    top = chosen[:MAX_ATTENTION_HEADS]
    if top:
        frames = _pick_frames(dataset, (heads_doc.get("demos") or {}).get("tasks") or [], n_frames, model.config.chunk)
        try:
            with torch.no_grad():
                inputs = model.prepare(frames)
        except (KeyError, ValueError) as e:
            raise ReportError(f"the demos do not fit the model: {e}") from None
        maps = decision_attention(model, inputs, top)
        mask = inputs["lang_mask"].numpy()
        figures += [plot_attention(h, maps[h], frames, model, mask, out_dir / f"attention_{h}.png") for h in top]

    path = out_dir / "report.md"
    path.write_text(_markdown(heads_doc, panels, chosen, figures))
    return path
