"""Read LeRobot v3.0 datasets (ours or lerobot-written, image columns) and sample action chunks.

Decoded images are cached in memory, decoded lazily, each PNG at most once. Why not a uint8 .npy
memmap cache under the dataset's cache/ dir: our datasets are few-shot demos (tens to hundreds of
episodes of 128 px frames: 10k frames x 2 cameras is ~1 GB decoded), so RAM is not the constraint,
while an on-disk cache brings invalidation, write permission (read-only fixtures, shared drives)
and concurrent-writer corner cases. Lazy decoding keeps opening instant and pays for a frame only
the first time it is sampled; `preload()` decodes everything up front, e.g. before forking
DataLoader workers so they share the pages copy-on-write. Everything else (state, actions, indices)
is held as contiguous numpy arrays, so a batch is a handful of fancy-indexing copies.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

import edge_steer.data.layout as layout
import edge_steer.data.stats as stats
from edge_steer.data.schema import BOOKKEEPING, STATS_PATH, DatasetError, DatasetSpec, Feature

KNOWN_EPISODE_COLUMNS = {*layout.REQUIRED_EPISODE_COLUMNS, "success"}
SKIPPED_PREFIXES = ("stats/", "data/", "videos/", "meta/")


@dataclass(frozen=True)
class EpisodeInfo:
    index: int
    length: int
    tasks: list[str]
    success: bool | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.tasks[0] if self.tasks else ""


@dataclass(frozen=True)
class EpisodeFilter:
    """Which episodes to load: all given criteria must hold; then the first `limit` (by index) are kept."""

    episodes: Sequence[int] | None = None
    tasks: Sequence[str] | str | None = None
    success: bool | None = None
    limit: int | None = None

    def select(self, episodes: list[EpisodeInfo]) -> list[EpisodeInfo]:
        tasks = [self.tasks] if isinstance(self.tasks, str) else self.tasks
        wanted = None if self.episodes is None else set(int(i) for i in self.episodes)
        out = [e for e in episodes
               if (wanted is None or e.index in wanted)
               and (tasks is None or any(t in tasks for t in e.tasks))
               and (self.success is None or e.success == self.success)]
        if wanted is not None and (unknown := wanted - {e.index for e in episodes}):
            raise DatasetError(f"episodes {sorted(unknown)} are not in the dataset ({len(episodes)} episodes)")
        if tasks is not None and (unknown_tasks := set(tasks) - {t for e in episodes for t in e.tasks}):
            raise DatasetError(f"tasks {sorted(unknown_tasks)} are not in the dataset")
        return out[: self.limit] if self.limit is not None else out


class _LazyImages:
    """PNG bytes for every frame of one camera, decoded on first use into one (N, H, W, 3) array."""

    def __init__(self, key: str, png: list[bytes], shape: tuple[int, ...]) -> None:
        self.key, self.png, self.shape = key, png, shape
        self.frames = np.empty((len(png), *shape), dtype=np.uint8)  # pages are only touched when decoded
        self.decoded = np.zeros(len(png), dtype=bool)

    def get(self, rows: np.ndarray) -> np.ndarray:
        todo = rows[~self.decoded[rows]]
        for r in np.unique(todo):
            self.frames[r] = self._decode(int(r))
        self.decoded[todo] = True
        return self.frames[rows]

    def _decode(self, row: int) -> np.ndarray:
        try:
            img = np.asarray(Image.open(io.BytesIO(self.png[row])).convert("RGB"))
        except (OSError, ValueError) as e:
            raise DatasetError(f"{self.key}: image of dataset row {row} is not a readable PNG/JPEG: {e}") from e
        if img.shape != self.shape:
            raise DatasetError(f"{self.key}: image of dataset row {row} is {img.shape}, info.json says {self.shape}")
        return img


class Dataset:
    """A LeRobot v3.0 dataset in memory. `len(ds)` counts frames of the selected episodes; sample
    positions and `ds.sample` indices run over those frames (0 .. len(ds) - 1)."""

    def __init__(self, root: str | Path, episode_filter: EpisodeFilter | None = None) -> None:
        self.root = Path(root)
        self.info = layout.read_info(self.root)
        if videos := [k for k, ft in self.info["features"].items() if ft.get("dtype") == "video"]:
            raise DatasetError(f"{self.root} stores cameras {videos} as videos under videos/; video-backed "
                               "datasets are not supported yet (record with image features)")
        self.spec = DatasetSpec.from_info(self.info)
        self.fps = self.spec.fps
        self.tasks = layout.read_tasks(self.root, self.info)
        table = layout.read_episodes(self.root, self.info)
        rows = table.to_pylist()
        all_episodes = [self._episode_info(r) for r in rows]
        self.episodes = (episode_filter or EpisodeFilter()).select(all_episodes)
        chosen = {e.index for e in self.episodes}
        self._rows = [r for r in rows if r["episode_index"] in chosen]
        self.stats = self._stats()
        self._load_frames()

    # ---- metadata ------------------------------------------------------------------------------

    def _episode_info(self, row: dict[str, Any]) -> EpisodeInfo:
        extra = {k: v for k, v in row.items()  # None: a column another episode set and this one did not
                 if k not in KNOWN_EPISODE_COLUMNS and not k.startswith(SKIPPED_PREFIXES) and v is not None}
        success = row.get("success")
        return EpisodeInfo(int(row["episode_index"]), int(row["length"]), list(row["tasks"] or []),
                           None if success is None else bool(success), extra)

    def _stats(self) -> stats.Stats:
        """Aggregated over the selected episodes from their per-episode stats (so a 5-demo subset gets
        its own normalization stats); meta/stats.json only if the episodes carry none."""
        per_episode = [s for s in (stats.from_columns(r) for r in self._rows) if s]
        if len(per_episode) == len(self._rows) and per_episode:
            return stats.aggregate(per_episode)
        path = self.root / STATS_PATH
        if path.is_file():
            try:
                return stats.from_json(json.loads(path.read_text()))
            except (OSError, ValueError) as e:
                raise DatasetError(f"{path} is corrupt: {e}") from e
        return {}

    def __repr__(self) -> str:
        return (f"Dataset({str(self.root)!r}, episodes={self.num_episodes}, frames={len(self)}, "
                f"tasks={len(self.tasks)}, fps={self.fps})")

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    def __len__(self) -> int:
        return len(self._ep_of_row)

    # ---- frames --------------------------------------------------------------------------------

    def _load_frames(self) -> None:
        features = {**self.spec.features, **{k: Feature(d, s) for k, (d, s) in BOOKKEEPING.items()}}
        parts: dict[str, list[Any]] = {k: [] for k in features}
        files: dict[Path, pa.Table] = {}
        fmt = self.info["data_path"]
        for row in self._rows:
            ep = int(row["episode_index"])
            path = self.root / fmt.format(chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])
            if path not in files:
                files.clear()  # episodes are sorted, so a file's episodes are consecutive
                files[path] = layout.read_parquet(path, f"data file of episode {ep}")
                if missing := [k for k in features if k not in files[path].column_names]:
                    raise DatasetError(f"data file {path} lacks columns {missing}")
            table = files[path]
            mask = pc.equal(table["episode_index"], ep)
            part = table.filter(mask)
            if part.num_rows != row["length"]:
                raise DatasetError(f"data file {path} holds {part.num_rows} frames of episode {ep}, "
                                   f"the metadata says {row['length']} (half-written or damaged dataset)")
            part = part.sort_by("frame_index")
            for key, ft in features.items():
                parts[key].append(_column(part[key], ft, key, path))
        files.clear()
        lengths = np.array([e.length for e in self.episodes], dtype=np.int64)
        ends = np.cumsum(lengths)
        self._starts = ends - lengths
        self._ep_end = np.repeat(ends, lengths)
        self._ep_of_row = np.repeat(np.arange(len(lengths)), lengths)
        self._pos_of_episode = {e.index: i for i, e in enumerate(self.episodes)}
        self._task_names = np.array(self.tasks if self.tasks else [""], dtype=object)
        self._arrays: dict[str, np.ndarray] = {}
        self._images: dict[str, _LazyImages] = {}
        for key, ft in features.items():
            if ft.is_image:
                self._images[key] = _LazyImages(key, [b for p in parts[key] for b in p], ft.shape)
            else:
                empty = np.zeros((0, *ft.shape), dtype=ft.dtype)
                arr = np.concatenate(parts[key]) if parts[key] else empty
                self._arrays[key] = arr[:, 0] if key in BOOKKEEPING else arr

    def _get(self, key: str, rows: np.ndarray) -> np.ndarray:
        if key in self._images:
            return self._images[key].get(rows)
        if key in self._arrays:
            return self._arrays[key][rows]
        raise DatasetError(f"unknown feature {key!r}; the dataset has {list(self._arrays) + list(self._images)}")

    def preload(self) -> None:
        """Decode every image now (otherwise each is decoded the first time it is sampled)."""
        everything = np.arange(len(self))
        for images in self._images.values():
            images.get(everything)

    def check_frames(self) -> None:
        """Decode the first frame of every episode from each camera: raises DatasetError where a frame
        does not decode to the shape info.json declares, before a command has spent any work on it."""
        firsts = np.array([s for s, e in zip(self._starts, self.episodes) if e.length], dtype=np.int64)
        for images in self._images.values():
            images.get(firsts)

    def episode(self, index: int) -> dict[str, np.ndarray]:
        """A whole episode by its episode_index: every feature as (T, ...) arrays, images uint8 (T, H, W, 3)."""
        if index not in self._pos_of_episode:
            raise DatasetError(f"episode {index} is not in this dataset (selected: {sorted(self._pos_of_episode)})")
        pos = self._pos_of_episode[index]
        rows = np.arange(self._starts[pos], self._starts[pos] + self.episodes[pos].length)
        return {k: self._get(k, rows) for k in [*self._images, *self._arrays]}

    def sample(self, indices: Sequence[int] | np.ndarray, chunk: int = 10, keys: Sequence[str] | None = None,
               action_key: str = "action") -> dict[str, np.ndarray]:
        """A training batch for frames `indices` (positions 0 .. len(ds) - 1).

        Observation features (default: every feature but the action) come from frame t; `action` is
        (B, chunk, A) for t .. t + chunk - 1 within t's episode, past the episode end padded by
        repeating its last action and flagged in `action_is_pad` (B, chunk) (LeRobot's convention).
        Images are uint8 (B, H, W, 3); `task` holds the instruction strings.
        """
        if chunk < 1:
            raise DatasetError(f"chunk must be >= 1, got {chunk}")
        if action_key not in self._arrays:
            raise DatasetError(f"the dataset has no {action_key!r} feature to make action chunks from")
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise DatasetError(f"sample indices must lie in [0, {len(self)}), got {idx.min()}..{idx.max()}")
        keys = [k for k in self.spec.features if k != action_key] if keys is None else list(keys)
        batch = {k: self._get(k, idx) for k in keys}
        steps = idx[:, None] + np.arange(chunk)
        end = self._ep_end[idx][:, None]
        batch[action_key] = self._arrays[action_key][np.minimum(steps, end - 1)]
        batch[f"{action_key}_is_pad"] = steps >= end
        for k in ("episode_index", "frame_index", "task_index"):
            batch[k] = self._arrays[k][idx]
        batch["task"] = self._task_names[batch["task_index"]]
        return batch


class ChunkSampler:
    """Shuffled batches of action-chunk samples, one epoch per iteration (reproducible from `seed`)."""

    def __init__(self, ds: Dataset, batch_size: int = 64, chunk: int = 10, keys: Sequence[str] | None = None,
                 seed: int | None = 0, shuffle: bool = True, drop_last: bool = False) -> None:
        if len(ds) == 0:
            raise DatasetError("cannot sample from a dataset with no frames")
        self.ds, self.batch_size, self.chunk, self.keys = ds, batch_size, chunk, keys
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        n = len(self.ds)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        order = self.rng.permutation(len(self.ds)) if self.shuffle else np.arange(len(self.ds))
        for b in range(len(self)):
            yield self.ds.sample(order[b * self.batch_size:(b + 1) * self.batch_size], self.chunk, self.keys)


def _column(col: pa.ChunkedArray, ft: Feature, key: str, path: Path) -> Any:
    """One episode's column -> numpy (T, *shape), or a list of encoded image bytes for images."""
    arr = col.combine_chunks()
    if ft.is_image:
        if not pa.types.is_struct(arr.type):
            raise DatasetError(f"{path}: image column {key!r} is {arr.type}, expected struct<bytes, path>")
        png = pc.struct_field(arr, "bytes").to_pylist()
        if any(b is None for b in png):
            raise DatasetError(f"{path}: image column {key!r} has frames without embedded bytes")
        return png
    if arr.null_count:
        raise DatasetError(f"{path}: column {key!r} has missing values")
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        values = arr.flatten().to_numpy(zero_copy_only=False)
    else:
        values = arr.to_numpy(zero_copy_only=False)
    if values.size != len(arr) * ft.shape[0]:
        raise DatasetError(f"{path}: column {key!r} does not have shape {ft.shape} per frame")
    return values.reshape(len(arr), *ft.shape).astype(ft.dtype, copy=False)
