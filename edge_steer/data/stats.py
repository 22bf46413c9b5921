"""Per-episode feature statistics and their aggregation, in LeRobot's stats format.

Each feature gets min/max/mean/std/count and the q01..q99 quantiles lerobot >= 0.4 also writes (so
our episode rows have the same columns as lerobot's and either writer can append to the other's
dataset). Vectors get per-dimension arrays; images get per-channel arrays of shape (3, 1, 1) with
values in [0, 1], exactly as lerobot stores them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

Stats = dict[str, dict[str, np.ndarray]]
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}


def vector_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """x: (T, n) numeric -> per-dimension stats. min/max keep an int dtype for int features."""
    xf = x.astype(np.float64)
    lo, hi = (xf.min(0), xf.max(0)) if x.dtype == bool else (x.min(0), x.max(0))
    stats = {"min": lo, "max": hi, "mean": xf.mean(0), "std": xf.std(0), "count": np.array([len(x)])}
    stats.update(zip(QUANTILES, np.quantile(xf, list(QUANTILES.values()), axis=0)))
    return stats


def image_stats(frames: np.ndarray) -> dict[str, np.ndarray]:
    """frames: (T, H, W, 3) uint8 -> per-channel stats in [0, 1], each of shape (3, 1, 1).

    Exact and fast through a 256-bin histogram per channel (no float copy of the pixels, no sort).
    """
    values = np.arange(256, dtype=np.float64)
    cols: dict[str, list[float]] = {k: [] for k in ("min", "max", "mean", "std", *QUANTILES)}
    for c in range(frames.shape[-1]):
        hist = np.bincount(frames[..., c].ravel(), minlength=256).astype(np.float64)
        n, nz = hist.sum(), np.flatnonzero(hist)
        mean = (hist * values).sum() / n
        cdf = np.cumsum(hist) / n
        cols["min"].append(values[nz[0]])
        cols["max"].append(values[nz[-1]])
        cols["mean"].append(mean)
        cols["std"].append(np.sqrt((hist * (values - mean) ** 2).sum() / n))
        for name, q in QUANTILES.items():
            cols[name].append(values[min(np.searchsorted(cdf, q), 255)])
    stats = {k: (np.array(v) / 255.0).reshape(-1, 1, 1) for k, v in cols.items()}
    stats["count"] = np.array([len(frames)])
    return stats


def aggregate(per_episode: Iterable[Mapping[str, Mapping[str, np.ndarray]]]) -> Stats:
    """Count-weighted merge of episode stats (exact mean/std via the parallel-variance formula;
    quantiles are count-weighted means of episode quantiles, the same approximation lerobot uses)."""
    by_feature: dict[str, list[Mapping[str, np.ndarray]]] = {}
    for ep in per_episode:
        for key, st in ep.items():
            by_feature.setdefault(key, []).append(st)
    out: Stats = {}
    for key, items in by_feature.items():
        counts = np.array([float(np.asarray(s["count"]).reshape(-1)[0]) for s in items])
        mean0 = np.asarray(items[0]["mean"], dtype=np.float64)
        w = (counts / counts.sum()).reshape(-1, *([1] * mean0.ndim))
        means = np.stack([np.asarray(s["mean"], dtype=np.float64) for s in items])
        stds = np.stack([np.asarray(s["std"], dtype=np.float64) for s in items])
        mean = (w * means).sum(0)
        agg = {
            "min": np.min(np.stack([np.asarray(s["min"]) for s in items]), axis=0),
            "max": np.max(np.stack([np.asarray(s["max"]) for s in items]), axis=0),
            "mean": mean,
            "std": np.sqrt((w * (stds**2 + (means - mean) ** 2)).sum(0)),
            "count": np.array([int(counts.sum())]),
        }
        for q in QUANTILES:
            if all(q in s for s in items):
                agg[q] = (w * np.stack([np.asarray(s[q], dtype=np.float64) for s in items])).sum(0)
        out[key] = agg
    return out


def to_columns(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Episode stats -> `stats/<feature>/<stat>` columns of the episodes parquet (plain lists)."""
    return {f"stats/{k}/{s}": np.asarray(v).tolist() for k, st in stats.items() for s, v in st.items()}


def from_columns(row: Mapping[str, Any]) -> Stats:
    """Inverse of `to_columns` for one episodes-parquet row (other columns are ignored)."""
    out: Stats = {}
    for col, value in row.items():
        parts = col.split("/")
        if len(parts) == 3 and parts[0] == "stats" and value is not None:
            out.setdefault(parts[1], {})[parts[2]] = np.asarray(value)
    return out


def to_json(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    return {k: {s: np.asarray(v).tolist() for s, v in st.items()} for k, st in stats.items()}


def from_json(data: Mapping[str, Mapping[str, Any]]) -> Stats:
    return {k: {s: np.asarray(v) for s, v in st.items()} for k, st in data.items()}
