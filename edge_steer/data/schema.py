"""What an episode frame holds: typed feature specs, the LeRobot v3.0 layout constants, frame validation.

Feature specs map one-to-one onto LeRobot's `meta/info.json` "features" entries, so a spec can be
written into a dataset and read back from one (ours or lerobot's) without a translation table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

CODEBASE_VERSION = "v3.0"
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
EPISODES_PATH = EPISODES_DIR + "/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
CHUNKS_SIZE = 1000  # files per chunk directory, as in lerobot
DATA_FILES_SIZE_IN_MB = 100
VIDEO_FILES_SIZE_IN_MB = 200

# Per-frame bookkeeping columns LeRobot adds to every dataset; the writer fills them, callers never do.
BOOKKEEPING: dict[str, tuple[str, tuple[int, ...]]] = {
    "timestamp": ("float32", (1,)),
    "frame_index": ("int64", (1,)),
    "episode_index": ("int64", (1,)),
    "index": ("int64", (1,)),
    "task_index": ("int64", (1,)),
}
IMAGE_NAMES = ["height", "width", "channels"]


class DatasetError(ValueError):
    """Bad frames, bad specs, unreadable or half-written datasets: the message names the culprit."""


@dataclass(frozen=True)
class Feature:
    """One per-frame feature. dtype is a numpy numeric dtype name ("float32", "int64", "bool", ...)
    or "image" (uint8 H x W x 3, stored as PNG bytes like LeRobot's image columns)."""

    dtype: str
    shape: tuple[int, ...]
    names: list[str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.dtype == "image":
            if len(self.shape) != 3 or self.shape[2] != 3:
                raise DatasetError(f"image features are (height, width, 3), got shape {self.shape}")
        else:
            try:
                kind = np.dtype(self.dtype).kind
            except TypeError:
                kind = "?"
            if kind not in ("f", "i", "u", "b"):
                raise DatasetError(f"unsupported feature dtype {self.dtype!r} (numeric, bool or 'image')")
            if len(self.shape) != 1 or self.shape[0] < 1:
                raise DatasetError(f"non-image features are 1-D vectors, got shape {self.shape}")

    @property
    def is_image(self) -> bool:
        return self.dtype == "image"

    def to_info(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "names": self.names}

    @classmethod
    def from_info(cls, key: str, ft: Mapping[str, Any]) -> Feature:
        try:
            names, shape = ft.get("names"), tuple(ft["shape"])
            if isinstance(names, dict):  # older lerobot datasets: {"motors": [...]}
                names = next(iter(names.values()), None)
            if ft["dtype"] == "image" and names == ["channels", "height", "width"]:
                names, shape = IMAGE_NAMES, (shape[1], shape[2], shape[0])  # PNG pixels are HWC anyway
            return cls(ft["dtype"], shape, list(names) if names is not None else None)
        except (KeyError, TypeError, IndexError) as e:
            raise DatasetError(f"feature {key!r} in meta/info.json is malformed: {ft!r}") from e
        except DatasetError as e:
            raise DatasetError(f"feature {key!r} in meta/info.json: {e}") from e


@dataclass(frozen=True)
class DatasetSpec:
    """The caller's features (bookkeeping columns excluded), frame rate and robot type."""

    fps: int
    features: dict[str, Feature]
    robot_type: str = "unknown"

    def __post_init__(self) -> None:
        if int(self.fps) <= 0:
            raise DatasetError(f"fps must be positive, got {self.fps}")
        for key in self.features:
            if key in BOOKKEEPING or key == "task":
                raise DatasetError(f"feature name {key!r} is reserved (the writer adds it)")
            if "/" in key:
                raise DatasetError(f"feature name {key!r} contains '/', which LeRobot forbids")

    @property
    def camera_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.is_image]

    def info_features(self) -> dict[str, dict[str, Any]]:
        """The `features` block of meta/info.json: ours first, then LeRobot's bookkeeping columns."""
        out = {k: f.to_info() for k, f in self.features.items()}
        out.update({k: Feature(d, s).to_info() for k, (d, s) in BOOKKEEPING.items()})
        return out

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> DatasetSpec:
        feats = {k: Feature.from_info(k, ft) for k, ft in info["features"].items() if k not in BOOKKEEPING}
        return cls(int(info["fps"]), feats, info.get("robot_type") or "unknown")

    def diff(self, other: DatasetSpec) -> list[str]:
        """Human-readable differences, for the 'spec does not match the dataset' error."""
        out = []
        if self.fps != other.fps:
            out.append(f"fps {self.fps} != {other.fps}")
        if self.robot_type != other.robot_type:
            out.append(f"robot_type {self.robot_type!r} != {other.robot_type!r}")
        for k in sorted(set(self.features) | set(other.features)):
            a, b = self.features.get(k), other.features.get(k)
            if a != b:
                out.append(f"{k}: {a} != {b}")
        return out


def default_spec(image_size: int = 96, fps: int = 10) -> DatasetSpec:
    """The project's episodes: two RGB cameras, TCP pose + gripper state, joints, 7-D delta action."""
    img = Feature("image", (image_size, image_size, 3), IMAGE_NAMES)
    return DatasetSpec(fps=fps, robot_type="franka_panda", features={
        "observation.images.front": img,
        "observation.images.wrist": img,
        "observation.state": Feature("float32", (8,), ["x", "y", "z", "qx", "qy", "qz", "qw", "gripper_width"]),
        "observation.joints": Feature("float32", (7,), [f"joint_{i}" for i in range(1, 8)]),
        "action": Feature("float32", (7,), ["dx", "dy", "dz", "drx", "dry", "drz", "gripper"]),
    })


def validate_frame(spec: DatasetSpec, frame: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Check a frame against the spec and return it as arrays of the exact stored dtype.

    Floats of any precision (and ints) are accepted for float features, since sim code naturally
    produces float64; anything that would change meaning is refused: a float image (0..1 or 0..255?),
    a CHW image, a float for an int feature, NaN/inf.
    """
    missing = [k for k in spec.features if k not in frame]
    unknown = [k for k in frame if k not in spec.features]
    if missing or unknown:
        raise DatasetError(f"frame keys do not match the spec: missing {missing}, unknown {unknown}")
    out: dict[str, np.ndarray] = {}
    for key, ft in spec.features.items():
        value = np.asarray(frame[key])
        if ft.is_image:
            if value.dtype != np.uint8:
                raise DatasetError(f"feature {key!r}: images must be uint8 (H, W, 3), got dtype {value.dtype}")
            if value.shape != ft.shape:
                hint = " (images are HWC, not CHW)" if value.shape == (3, *ft.shape[:2]) else ""
                raise DatasetError(f"feature {key!r}: expected shape {ft.shape}, got {value.shape}{hint}")
            out[key] = value
            continue
        want = np.dtype(ft.dtype)
        ok_kinds = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}[want.kind]
        if value.dtype.kind not in ok_kinds:
            raise DatasetError(f"feature {key!r}: expected {ft.dtype}, got dtype {value.dtype}")
        if value.shape == () and ft.shape == (1,):
            value = value.reshape(1)
        if value.shape != ft.shape:
            raise DatasetError(f"feature {key!r}: expected shape {ft.shape}, got {value.shape}")
        cast = value.astype(want)
        if want.kind == "f" and not np.all(np.isfinite(cast)):
            raise DatasetError(f"feature {key!r} contains NaN or inf: {value}")
        if want.kind in "iu" and not np.array_equal(cast, value):
            raise DatasetError(f"feature {key!r}: values do not fit {ft.dtype}: {value}")
        out[key] = cast
    return out
