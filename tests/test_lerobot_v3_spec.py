"""What our writer produces, read back by an independent LeRobot v3.0 reader (tests/lerobot_v3_spec.py,
written from the format's description): dtypes, shapes, index columns, episode metadata, stats and task
index all as LeRobot defines them, and the frames exactly as written. Runs in CI (no lerobot needed)."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lerobot_v3_spec as v3
from edge_steer.data import DatasetWriter, default_spec

TASKS = ("put the red cube on the blue plate", "put the green cylinder in the yellow bowl")


def _episode(rng, length: int) -> list[dict]:
    return [{"observation.images.front": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
             "observation.images.wrist": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
             "observation.state": rng.normal(0, 0.3, 8).astype(np.float32),
             "observation.joints": rng.normal(0, 1.0, 7).astype(np.float32),
             "action": rng.normal(0, 0.01, 7).astype(np.float32)} for _ in range(length)]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Five episodes of two tasks and different lengths, written in two sessions (the second appends)."""
    root = tmp_path_factory.mktemp("v3") / "ds"
    rng = np.random.default_rng(3)
    episodes = []
    for session in ([(TASKS[0], 7), (TASKS[1], 4), (TASKS[0], 9)], [(TASKS[1], 5), (TASKS[0], 3)]):
        with DatasetWriter(root, default_spec(image_size=32)) as w:
            for task, length in session:
                frames = _episode(rng, length)
                w.begin_episode()
                for f in frames:
                    w.add_frame(f, task=task)
                w.end_episode(success=length > 4, extra={"seed": len(episodes)})
                episodes.append((task, frames))
    return root, episodes


def test_our_dataset_reads_as_lerobot_v3(written):
    root, episodes = written
    ds = v3.read(root)
    assert ds.info["total_episodes"] == 5 and ds.info["total_frames"] == sum(len(f) for _, f in episodes)
    assert ds.info["fps"] == 10 and ds.info["robot_type"] == "franka_panda"
    assert sorted(ds.tasks) == sorted(TASKS)
    for (task, frames), meta, got in zip(episodes, ds.episodes, ds.frames):
        assert meta["tasks"] == [task] and meta["length"] == len(frames)
        assert np.all(got["task_index"] == ds.tasks.index(task))
        for key in frames[0]:
            want = np.stack([f[key] for f in frames])
            assert got[key].dtype == want.dtype and np.array_equal(got[key], want), key
    # the stats LeRobot normalises with, per feature and per episode
    assert ds.stats["observation.state"]["mean"].shape == (8,)
    assert ds.stats["observation.images.front"]["mean"].shape == (3, 1, 1)


def _copy(written, tmp_path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(written[0], dst)
    return dst


def _rewrite_parquet(path: Path, column: str, fn) -> None:
    t = pq.read_table(path)
    i = t.column_names.index(column)
    pq.write_table(t.set_column(i, column, pa.array(fn(t.column(column).to_pylist()), t.schema.field(i).type)), path)


def _edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


MUTATIONS = {
    "timestamps off the fps grid": (lambda r: _rewrite_parquet(r / "data/chunk-000/file-000.parquet", "timestamp",
                                                               lambda v: [x * 2 for x in v]), "timestamps"),
    "state declared 9-D": (lambda r: _edit_json(r / "meta/info.json",
                                                lambda d: d["features"]["observation.state"].update(shape=[9])),
                           "rows are not 9 long"),
    "stats mean wrong": (lambda r: _edit_json(r / "meta/stats.json", lambda d: d["action"].update(
        mean=[m + 1 for m in d["action"]["mean"]])), "stats.json/action/mean"),
    "episode ranges overlap": (lambda r: _rewrite_parquet(r / "meta/episodes/chunk-000/file-000.parquet",
                                                          "dataset_from_index", lambda v: [0] * len(v)),
                               "do not follow"),
    "index not global": (lambda r: _rewrite_parquet(r / "data/chunk-000/file-000.parquet", "index",
                                                    lambda v: [x + 1 for x in v]), "dataset_from_index + frame_index"),
    "default feature missing": (lambda r: _edit_json(r / "meta/info.json", lambda d: d["features"].pop("task_index")),
                                "default feature 'task_index'"),
    "version": (lambda r: _edit_json(r / "meta/info.json", lambda d: d.update(codebase_version="v2.1")),
                "codebase_version"),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_the_spec_reader_catches_what_breaks_the_format(written, tmp_path, name):
    """The reader is not vacuous: each break of a rule above is reported by name."""
    mutate, expect = MUTATIONS[name]
    root = _copy(written, tmp_path)
    mutate(root)
    with pytest.raises(v3.SpecViolation, match=re.escape(expect)):
        v3.read(root)
