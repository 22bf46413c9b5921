"""An independent reader of the LeRobot v3.0 dataset format, written from the format's own description
(LeRobot's `LeRobotDataset` docstring and dataset utilities, codebase_version "v3.0"), not from
edge_steer's writer or reader: it shares no code with `edge_steer.data` and checks every rule it reads.

The format, as LeRobot describes it:
* `meta/info.json`: codebase_version "v3.0", fps, robot_type, total_episodes / total_frames / total_tasks,
  chunks_size, splits {"train": "0:N"}, data_path / video_path templates
  (`data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet`), and `features`: name -> {dtype, shape,
  names}. Every dataset carries the default features timestamp (float32, (1,)) and frame_index,
  episode_index, index, task_index (int64, (1,)). Names hold no '/'.
* `data/chunk-XXX/file-YYY.parquet`: one row per frame, several episodes per file. A (1,) feature is a
  scalar column, an (n,) feature a list of n values, an `image` feature a struct {bytes, path} of an
  encoded image; `video` features live in `videos/{key}/chunk-XXX/file-YYY.mp4`, not in the parquet.
* `meta/episodes/chunk-XXX/file-YYY.parquet`: one row per episode: episode_index, tasks (list of
  strings), length, data/chunk_index, data/file_index, dataset_from_index, dataset_to_index (global
  frame range, end exclusive), meta/episodes/chunk_index and file_index (the file the row is in),
  `videos/{key}/...` for video features, and per-episode statistics flattened as `stats/{feature}/{stat}`.
* `meta/tasks.parquet`: a pandas frame indexed by the task string with one column task_index.
* `meta/stats.json`: {feature: {min, max, mean, std, count, ...}}: vectors have the feature's shape,
  images (3, 1, 1) per channel in [0, 1], count is (1,).
* Frames are sampled at fps: timestamp = frame_index / fps within a tolerance (LeRobot's 1e-4 s), and
  index = dataset_from_index + frame_index.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

VERSION = "v3.0"
DEFAULT_FEATURES = {"timestamp": ("float32", (1,)), "frame_index": ("int64", (1,)),
                    "episode_index": ("int64", (1,)), "index": ("int64", (1,)), "task_index": ("int64", (1,))}
INFO_KEYS = ("codebase_version", "robot_type", "total_episodes", "total_frames", "total_tasks", "chunks_size",
             "fps", "splits", "data_path", "video_path", "features")
EPISODE_COLUMNS = ("episode_index", "tasks", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
                   "dataset_to_index", "meta/episodes/chunk_index", "meta/episodes/file_index")
STATS = ("min", "max", "mean", "std", "count")
NUMERIC = {"bool", "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
           "uint32", "uint64"}
TIMESTAMP_TOLERANCE_S = 1e-4


class SpecViolation(AssertionError):
    """The dataset breaks a rule of the LeRobot v3.0 format; the message says which."""


@dataclass
class V3Dataset:
    info: dict[str, Any]
    tasks: list[str]                          # by task_index
    episodes: list[dict[str, Any]]            # the episodes-metadata rows, by episode_index
    frames: list[dict[str, np.ndarray]]       # per episode: feature -> (length, *shape); images (T, H, W, C)
    stats: dict[str, dict[str, np.ndarray]]


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise SpecViolation(msg)


def read(root: str | Path) -> V3Dataset:
    root = Path(root)
    info = _read_info(root)
    tasks = _read_tasks(root, info)
    episodes = _read_episodes(root, info)
    frames = [_read_episode_frames(root, info, ep, tasks) for ep in episodes]
    indices = np.concatenate([f["index"] for f in frames]) if frames else np.zeros(0, np.int64)
    _require(np.array_equal(np.sort(indices), np.arange(info["total_frames"])),
             "the `index` column is not 0 .. total_frames - 1, each once")
    stats = _read_stats(root, info, frames)
    for ep, f in zip(episodes, frames):
        _check_episode_stats(info, ep, f)
    return V3Dataset(info, tasks, episodes, frames, stats)


# ---- meta/info.json ------------------------------------------------------------------------------
def _read_info(root: Path) -> dict[str, Any]:
    path = root / "meta" / "info.json"
    _require(path.is_file(), f"{path} is missing")
    info = json.loads(path.read_text())
    _require(not (missing := [k for k in INFO_KEYS if k not in info]), f"info.json lacks {missing}")
    _require(info["codebase_version"] == VERSION, f"codebase_version is {info['codebase_version']!r}")
    _require(isinstance(info["fps"], int) and info["fps"] > 0, f"fps must be a positive int: {info['fps']!r}")
    _require(info["splits"].get("train") == f"0:{info['total_episodes']}", f"splits {info['splits']} do not "
             f"cover the {info['total_episodes']} episodes")
    probe = info["data_path"].format(chunk_index=1, file_index=2)
    _require(probe == "data/chunk-001/file-002.parquet", f"data_path {info['data_path']!r} is not v3.0's")
    feats = info["features"]
    for key, (dtype, shape) in DEFAULT_FEATURES.items():
        _require(key in feats, f"default feature {key!r} missing from info.json")
        _require(feats[key]["dtype"] == dtype and tuple(feats[key]["shape"]) == shape,
                 f"default feature {key!r} is {feats[key]}, expected {dtype} {shape}")
    for key, ft in feats.items():
        _require("/" not in key, f"feature name {key!r} contains '/'")
        _require({"dtype", "shape"} <= set(ft), f"feature {key!r} lacks dtype or shape")
        _require(ft["dtype"] in NUMERIC | {"image", "video", "string"}, f"feature {key!r}: dtype {ft['dtype']!r}")
        shape = ft["shape"]
        _require(isinstance(shape, list) and shape and all(isinstance(s, int) and s > 0 for s in shape),
                 f"feature {key!r}: shape {shape!r} is not a list of positive ints")
        if ft["dtype"] in ("image", "video"):
            _require(len(shape) == 3, f"camera {key!r}: shape {shape} is not (H, W, C) or (C, H, W)")
            names = ft.get("names")
            _require(names is None or len(names) == 3, f"camera {key!r}: names {names!r}")
            if ft["dtype"] == "video":
                _require(info["video_path"] is not None, f"video feature {key!r} but video_path is null")
    return info


def _hwc(ft: dict[str, Any]) -> tuple[int, int, int]:
    """A camera feature's (height, width, channels), from its names where given (LeRobot writes both
    orders), else from where the 3 channels sit."""
    shape, names = ft["shape"], [n.lower() for n in (ft.get("names") or [])]
    if names and names[0] in ("channels", "channel", "c"):
        return shape[1], shape[2], shape[0]
    if names:
        return shape[0], shape[1], shape[2]
    return (shape[1], shape[2], shape[0]) if shape[0] == 3 and shape[2] != 3 else (shape[0], shape[1], shape[2])


# ---- meta/tasks.parquet --------------------------------------------------------------------------
def _read_tasks(root: Path, info: dict[str, Any]) -> list[str]:
    path = root / "meta" / "tasks.parquet"
    _require(path.is_file(), f"{path} is missing")
    table = pq.read_table(path)
    _require("task_index" in table.column_names, "tasks.parquet has no task_index column")
    _require(pa.types.is_integer(table.schema.field("task_index").type), "task_index is not an integer column")
    pandas_meta = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
    index_cols = [c for c in pandas_meta.get("index_columns", []) if isinstance(c, str)]
    # the task string is the frame's index (stored as a column the pandas metadata names)
    task_col = index_cols[0] if index_cols else ("task" if "task" in table.column_names else None)
    _require(task_col is not None and task_col in table.column_names,
             "tasks.parquet does not hold the task strings as its pandas index")
    _require(pa.types.is_string(table.schema.field(task_col).type) or
             pa.types.is_large_string(table.schema.field(task_col).type), "task strings are not strings")
    by_index = dict(zip(table.column("task_index").to_pylist(), table.column(task_col).to_pylist()))
    _require(sorted(by_index) == list(range(table.num_rows)), f"task_index values {sorted(by_index)} are not 0..n-1")
    _require(table.num_rows == info["total_tasks"], f"{table.num_rows} tasks, info says {info['total_tasks']}")
    tasks = [by_index[i] for i in range(table.num_rows)]
    _require(len(set(tasks)) == len(tasks), "task strings are not unique")
    return tasks


# ---- meta/episodes -------------------------------------------------------------------------------
def _chunk_file(path: Path) -> tuple[int, int]:
    chunk, file = path.parent.name, path.stem
    _require(chunk.startswith("chunk-") and file.startswith("file-"), f"{path} is not chunk-XXX/file-YYY")
    return int(chunk[6:]), int(file[5:])


def _read_episodes(root: Path, info: dict[str, Any]) -> list[dict[str, Any]]:
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    _require(bool(files) or info["total_episodes"] == 0, "meta/episodes holds no parquet file")
    rows = []
    for path in files:
        table = pq.read_table(path)
        _require(not (missing := [c for c in EPISODE_COLUMNS if c not in table.column_names]),
                 f"{path} lacks episode columns {missing}")
        tasks_type = table.schema.field("tasks").type
        _require(pa.types.is_list(tasks_type) or pa.types.is_large_list(tasks_type), "`tasks` is not a list column")
        where = _chunk_file(path)
        for row in table.to_pylist():
            _require((row["meta/episodes/chunk_index"], row["meta/episodes/file_index"]) == where,
                     f"episode {row['episode_index']} says it is in {row['meta/episodes/chunk_index']}/"
                     f"{row['meta/episodes/file_index']} but is in {path}")
            rows.append(row)
    rows.sort(key=lambda r: r["episode_index"])
    _require([r["episode_index"] for r in rows] == list(range(info["total_episodes"])),
             f"episode indices are not 0..{info['total_episodes'] - 1}")
    start = 0
    for r in rows:
        _require(r["length"] > 0 and r["dataset_from_index"] == start and
                 r["dataset_to_index"] == start + r["length"],
                 f"episode {r['episode_index']}: frames [{r['dataset_from_index']}, {r['dataset_to_index']}) "
                 f"with length {r['length']} do not follow the episode before (which ended at {start})")
        start = r["dataset_to_index"]
        for key, ft in info["features"].items():
            if ft["dtype"] == "video":
                cols = [f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
                _require(all(c in r for c in cols), f"episode {r['episode_index']} lacks {cols}")
                mp4 = root / info["video_path"].format(video_key=key, chunk_index=r[cols[0]], file_index=r[cols[1]])
                _require(mp4.is_file(), f"{mp4} is missing")
    _require(start == info["total_frames"], f"episodes hold {start} frames, info says {info['total_frames']}")
    return rows


# ---- data/ ---------------------------------------------------------------------------------------
def _column(table: pa.Table, key: str, ft: dict[str, Any], path: Path) -> np.ndarray:
    col = table.column(key).combine_chunks()
    _require(col.null_count == 0, f"{path}: column {key!r} has nulls")
    if ft["dtype"] == "image":
        _require(pa.types.is_struct(col.type) and {col.type.field(i).name for i in range(col.type.num_fields)}
                 >= {"bytes", "path"}, f"{path}: image column {key!r} is {col.type}, not struct<bytes, path>")
        h, w, c = _hwc(ft)
        out = []
        for b in col.field("bytes").to_pylist():
            _require(b is not None, f"{path}: image {key!r} without embedded bytes")
            img = np.asarray(Image.open(io.BytesIO(b)))
            img = img[..., None] if img.ndim == 2 else img
            _require(img.shape == (h, w, c), f"{path}: image {key!r} decodes to {img.shape}, info says {(h, w, c)}")
            out.append(img)
        return np.stack(out) if out else np.zeros((0, h, w, c), np.uint8)
    want = np.dtype(ft["dtype"])
    if tuple(ft["shape"]) == (1,):
        _require(not pa.types.is_nested(col.type), f"{path}: (1,) feature {key!r} is {col.type}, not a scalar")
        values = col.to_numpy(zero_copy_only=False)
        _require(values.dtype == want, f"{path}: column {key!r} holds {values.dtype}, info says {want}")
        return values
    _require(len(ft["shape"]) == 1, f"{key!r}: this reader knows 1-D vectors only, not {ft['shape']}")
    _require(pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or
             pa.types.is_large_list(col.type), f"{path}: vector feature {key!r} is {col.type}, not a list")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    _require(bool(np.all(lengths == ft["shape"][0])), f"{path}: {key!r} rows are not {ft['shape'][0]} long")
    values = col.flatten().to_numpy(zero_copy_only=False)
    _require(values.dtype == want, f"{path}: column {key!r} holds {values.dtype}, info says {want}")
    return values.reshape(len(col), ft["shape"][0])


def _read_episode_frames(root: Path, info: dict[str, Any], ep: dict[str, Any],
                         tasks: list[str]) -> dict[str, np.ndarray]:
    path = root / info["data_path"].format(chunk_index=ep["data/chunk_index"], file_index=ep["data/file_index"])
    _require(path.is_file(), f"episode {ep['episode_index']}: data file {path} is missing")
    table = pq.read_table(path)
    stored = {k: ft for k, ft in info["features"].items() if ft["dtype"] != "video"}
    _require(not (missing := [k for k in stored if k not in table.column_names]), f"{path} lacks columns {missing}")
    rows = np.flatnonzero(table.column("episode_index").to_numpy() == ep["episode_index"])
    _require(len(rows) == ep["length"], f"{path} holds {len(rows)} frames of episode {ep['episode_index']}, "
             f"its metadata says {ep['length']}")
    part = table.take(pa.array(rows))
    frames = {k: _column(part, k, ft, path) for k, ft in stored.items()}
    n = ep["length"]
    _require(np.array_equal(frames["frame_index"], np.arange(n)), f"episode {ep['episode_index']}: frame_index "
             "is not 0..length-1 in row order")
    _require(np.array_equal(frames["index"], ep["dataset_from_index"] + np.arange(n)),
             f"episode {ep['episode_index']}: index is not dataset_from_index + frame_index")
    _require(bool(np.all(np.abs(frames["timestamp"] - np.arange(n) / info["fps"]) <= TIMESTAMP_TOLERANCE_S)),
             f"episode {ep['episode_index']}: timestamps are not frame_index / fps")
    ti = frames["task_index"]
    _require(bool(np.all((ti >= 0) & (ti < len(tasks)))), f"episode {ep['episode_index']}: task_index out of range")
    _require(sorted({tasks[i] for i in ti}) == sorted(ep["tasks"]),
             f"episode {ep['episode_index']}: its frames' tasks {sorted({tasks[i] for i in ti})} are not its "
             f"metadata's {ep['tasks']}")
    return frames


# ---- statistics ----------------------------------------------------------------------------------
def _stat_shape(ft: dict[str, Any], stat: str) -> tuple[int, ...]:
    if stat == "count":
        return (1,)
    return (_hwc(ft)[2], 1, 1) if ft["dtype"] in ("image", "video") else tuple(ft["shape"])


def _check_stats(where: str, stats: dict[str, Any], ft: dict[str, Any], data: np.ndarray | None,
                 frames: int) -> dict[str, np.ndarray]:
    _require(not (missing := [s for s in STATS if s not in stats]), f"{where} lacks {missing}")
    out = {}
    for stat, value in stats.items():
        arr = np.asarray(value, dtype=np.float64)
        want = _stat_shape(ft, stat)
        _require(arr.shape == want, f"{where}/{stat} has shape {arr.shape}, expected {want}")
        out[stat] = arr
    if ft["dtype"] in ("image", "video"):
        _require(1 <= out["count"][0] <= frames, f"{where}/count {out['count'][0]} is not in 1..{frames}")
        _require(bool(np.all((out["min"] >= 0) & (out["max"] <= 1))), f"{where}: image stats are not in [0, 1]")
        if data is not None:   # every sampled pixel lies within the frames' own range, per channel
            px = data.reshape(-1, data.shape[-1]).astype(np.float64) / 255.0
            _require(bool(np.all(out["min"][:, 0, 0] >= px.min(0) - 1e-6) and
                          np.all(out["max"][:, 0, 0] <= px.max(0) + 1e-6)), f"{where}: min/max outside the pixels'")
        return out
    _require(out["count"][0] == frames, f"{where}/count is {out['count'][0]}, the frames are {frames}")
    if data is not None:
        x = data.reshape(len(data), -1).astype(np.float64)
        for stat, ref in (("min", x.min(0)), ("max", x.max(0)), ("mean", x.mean(0)), ("std", x.std(0))):
            _require(np.allclose(out[stat].reshape(-1), ref, rtol=1e-5, atol=1e-6),
                     f"{where}/{stat} is {out[stat].reshape(-1)}, the frames give {ref}")
    return out


def _read_stats(root: Path, info: dict[str, Any],
                frames: list[dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    path = root / "meta" / "stats.json"
    _require(path.is_file(), f"{path} is missing")
    stats = json.loads(path.read_text())
    out = {}
    for key, ft in info["features"].items():
        if ft["dtype"] == "string" or (key in DEFAULT_FEATURES and key not in stats):
            continue
        _require(key in stats, f"stats.json has no entry for feature {key!r}")
        data = np.concatenate([f[key] for f in frames]) if frames and key in frames[0] else None
        out[key] = _check_stats(f"stats.json/{key}", stats[key], ft, data, info["total_frames"])
    return out


def _check_episode_stats(info: dict[str, Any], ep: dict[str, Any], frames: dict[str, np.ndarray]) -> None:
    for key, ft in info["features"].items():
        cols = {c.split("/")[-1]: v for c, v in ep.items() if c.startswith(f"stats/{key}/")}
        if ft["dtype"] == "string" or (key in DEFAULT_FEATURES and not cols):
            continue
        _require(bool(cols), f"episode {ep['episode_index']} has no stats/{key}/... columns")
        _check_stats(f"episode {ep['episode_index']} stats/{key}", cols, ft, frames.get(key), ep["length"])
