"""The LeRobot v3.0 files on disk: atomic writes, and metadata reads that fail with clear messages.

Commit protocol (shared by writer and reader): `meta/info.json` is written last, so its
`total_episodes` / `total_frames` / `total_tasks` are the commit record. Episode rows with
`episode_index >= total_episodes`, tasks with `task_index >= total_tasks`, and data files no committed
episode points at are leftovers of a killed writer: readers ignore them, the next writer removes them.
"""

from __future__ import annotations

import fcntl
import json
import re
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from edge_steer.data.schema import (
    CODEBASE_VERSION,
    EPISODES_DIR,
    INFO_PATH,
    TASKS_PATH,
    DatasetError,
)
from edge_steer.files import TMP_SUFFIX, atomic_write, atomic_write_text

REQUIRED_INFO = ("codebase_version", "fps", "features", "total_episodes", "total_frames", "data_path")
REQUIRED_EPISODE_COLUMNS = ("episode_index", "tasks", "length", "data/chunk_index", "data/file_index",
                            "dataset_from_index", "dataset_to_index")
LOCK_NAME = "meta/.writer.lock"
FILE_RE = re.compile(r"file-\d+\.parquet")


def is_leftover(root: Path, path: Path) -> bool:
    """A writer's lock file or a temp file: not content, so a directory of only these counts as empty."""
    return path.relative_to(root).as_posix() == LOCK_NAME or (path.name.startswith(".")
                                                                and path.name.endswith(TMP_SUFFIX))


def write_parquet(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda f: pq.write_table(table, f, compression="snappy"))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=4, ensure_ascii=False))


def read_parquet(path: Path, what: str) -> pa.Table:
    if not path.is_file():
        raise DatasetError(f"{what} {path} is missing (half-written or damaged dataset)")
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(f"{what} {path} is unreadable: {e}") from e


def read_info(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise DatasetError(f"dataset directory {root} does not exist")
    path = root / INFO_PATH
    if not path.is_file():
        raise DatasetError(f"{root} is not a LeRobot dataset: {INFO_PATH} is missing")
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} is corrupt: {e}") from e
    if not isinstance(info, dict) or (missing := [k for k in REQUIRED_INFO if k not in info]):
        raise DatasetError(f"{path} is corrupt: missing {missing if isinstance(info, dict) else 'everything'}")
    version = str(info["codebase_version"])
    if not version.startswith("v3."):
        raise DatasetError(
            f"{root} is a LeRobot {version} dataset; only {CODEBASE_VERSION} is supported "
            "(lerobot converts v2.1 with `python -m lerobot.datasets.v30.convert_dataset_v21_to_v30`)")
    return info


def episode_files(root: Path) -> list[Path]:
    return sorted((root / EPISODES_DIR).glob("chunk-*/file-*.parquet"))


def read_episodes(root: Path, info: dict[str, Any]) -> pa.Table:
    """All committed episode rows (stats columns included), sorted by episode_index."""
    total = int(info["total_episodes"])
    files = episode_files(root)
    if total == 0:
        return pa.table({c: pa.array([], pa.int64()) for c in REQUIRED_EPISODE_COLUMNS if c != "tasks"})
    if not files:
        raise DatasetError(f"{root}: {INFO_PATH} lists {total} episodes but {EPISODES_DIR}/ has no parquet file")
    try:
        table = pa.concat_tables([read_parquet(f, "episodes metadata") for f in files], promote_options="permissive")
    except pa.ArrowException as e:
        raise DatasetError(f"{root}: episodes metadata files disagree on their columns: {e}") from e
    if missing := [c for c in REQUIRED_EPISODE_COLUMNS if c not in table.column_names]:
        raise DatasetError(f"{root}: episodes metadata lacks columns {missing}")
    idx = table["episode_index"].to_numpy()
    table = table.filter(pa.array(idx < total)).sort_by("episode_index")
    got = table["episode_index"].to_numpy()
    if not np.array_equal(got, np.arange(total)):
        raise DatasetError(f"{root}: {INFO_PATH} says {total} episodes but the episodes metadata has "
                           f"{len(got)} of them (half-written or damaged dataset)")
    return table


def read_tasks(root: Path, info: dict[str, Any]) -> list[str]:
    """Committed tasks by task_index. LeRobot writes tasks.parquet from pandas, task strings as the index."""
    total = int(info.get("total_tasks", 0))
    if total == 0:
        return []
    table = read_parquet(root / TASKS_PATH, "tasks file")
    pandas_meta = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
    candidates = ["task", *[c for c in pandas_meta.get("index_columns", []) if isinstance(c, str)]]
    name_col = next((c for c in candidates if c in table.column_names), None)
    if name_col is None or "task_index" not in table.column_names:
        raise DatasetError(f"{root / TASKS_PATH} has no task strings / task_index column")
    tasks: list[str | None] = [None] * total
    for i, name in zip(table["task_index"].to_pylist(), table[name_col].to_pylist(), strict=True):
        if i is not None and 0 <= i < total:
            tasks[i] = name
    if None in tasks:
        raise DatasetError(f"{root / TASKS_PATH} lacks task_index {tasks.index(None)} of {total}")
    return tasks  # type: ignore[return-value]


def tasks_table(tasks: list[str]) -> pa.Table:
    """tasks.parquet exactly as lerobot's pandas writes it: task_index column, task strings as index."""
    pandas_meta = {
        "index_columns": ["__index_level_0__"], "column_indexes": [],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode", "numpy_type": "object",
             "metadata": None},
        ],
    }
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()),
                      "__index_level_0__": pa.array(tasks, pa.string())})
    return table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)})


def next_file(chunk: int, file: int, chunks_size: int) -> tuple[int, int]:
    """The (chunk, file) after this one: a chunk directory holds `chunks_size` files, as in lerobot."""
    return (chunk + 1, 0) if file >= chunks_size - 1 else (chunk, file + 1)


def lock(root: Path) -> IO[bytes]:
    """Exclusive advisory lock for one writer per dataset; the OS drops it if the writer dies."""
    path = root / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "ab")  # "ab": taking the lock leaves the file untouched
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        handle.close()
        raise DatasetError(f"another DatasetWriter has {root} open") from e
    return handle
