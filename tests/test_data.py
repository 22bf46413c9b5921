"""edge_steer.data: LeRobot v3.0 layout round trip, appending, validation, chunk sampling, bad input,
crash safety (writers killed mid-episode and mid-commit), a real lerobot-written fixture, and an
interop check against lerobot itself when it is importable."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from edge_steer.data import (
    ChunkSampler,
    Dataset,
    DatasetError,
    DatasetSpec,
    DatasetWriter,
    EpisodeFilter,
    Feature,
    default_spec,
)
from edge_steer.data import reader as reader_mod

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "lerobot_v3_tiny"
SIZE = 24  # small images keep the suite fast; the layout does not care
TASKS = ["put the red cube on the plate", "open the drawer"]


def make_frame(ep: int, t: int, size: int = SIZE) -> dict[str, np.ndarray]:
    """Deterministic random frame, so a crashed child's episodes can be re-derived here."""
    rng = np.random.default_rng([ep, t])
    return {
        "observation.images.front": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "observation.images.wrist": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "observation.state": rng.normal(size=8).astype(np.float32),
        "observation.joints": rng.normal(size=7).astype(np.float32),
        "action": rng.normal(size=7),  # float64 on purpose: the writer stores float32
    }


def ep_len(ep: int) -> int:
    return 5 + 2 * ep


def write_episodes(writer: DatasetWriter, episodes: range) -> None:
    for ep in episodes:
        writer.begin_episode()
        for t in range(ep_len(ep)):
            writer.add_frame(make_frame(ep, t), task=TASKS[ep % 2])
        assert writer.end_episode(success=ep % 3 != 1, extra={"seed": 100 + ep, "task_name": f"t{ep % 2}"}) == ep


def assert_episode_intact(ds: Dataset, ep: int) -> None:
    got = ds.episode(ep)
    for t in range(ep_len(ep)):
        for key, want in make_frame(ep, t).items():
            np.testing.assert_array_equal(got[key][t], want.astype(np.float32) if key == "action" else want)
    np.testing.assert_array_equal(got["frame_index"], np.arange(ep_len(ep)))
    np.testing.assert_array_equal(got["episode_index"], np.full(ep_len(ep), ep))


@pytest.fixture
def three(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    with DatasetWriter(root, default_spec(image_size=SIZE)) as w:
        write_episodes(w, range(3))
    return root


# ---- round trip and layout ---------------------------------------------------------------------

def test_round_trip_bitwise(three: Path) -> None:
    ds = Dataset(three)
    assert len(ds) == sum(ep_len(e) for e in range(3)) and ds.num_episodes == 3
    assert ds.tasks == TASKS
    assert [e.index for e in ds.episodes] == [0, 1, 2]
    assert [e.success for e in ds.episodes] == [True, False, True]
    assert ds.episodes[2].task == TASKS[0] and ds.episodes[2].extra == {"seed": 102, "task_name": "t0"}
    assert ds.spec == default_spec(image_size=SIZE)
    for ep in range(3):
        assert_episode_intact(ds, ep)


def test_v3_layout_files(three: Path) -> None:
    info = json.loads((three / "meta/info.json").read_text())
    n = sum(ep_len(e) for e in range(3))
    assert info["codebase_version"] == "v3.0"
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (3, n, 2)
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] is None and info["chunks_size"] == 1000 and info["fps"] == 10
    assert info["splits"] == {"train": "0:3"} and info["robot_type"] == "franka_panda"
    assert info["features"]["observation.images.front"] == {"dtype": "image", "shape": [SIZE, SIZE, 3],
                                                            "names": ["height", "width", "channels"]}
    assert list(info["features"])[-5:] == ["timestamp", "frame_index", "episode_index", "index", "task_index"]

    for ep in range(3):  # one data file per episode, v3 path template
        table = pq.read_table(three / f"data/chunk-000/file-{ep:03d}.parquet")
        assert table.num_rows == ep_len(ep)
        assert str(table.schema.field("observation.images.front").type) == "struct<bytes: binary, path: string>"
        assert str(table.schema.field("observation.state").type) == "fixed_size_list<element: float>[8]"
        assert table["episode_index"].to_pylist() == [ep] * ep_len(ep)
    episodes = pq.read_table(three / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    starts = np.cumsum([0] + [ep_len(e) for e in range(3)])
    for ep, row in enumerate(episodes):
        assert row["episode_index"] == ep and row["length"] == ep_len(ep) and row["tasks"] == [TASKS[ep % 2]]
        assert (row["data/chunk_index"], row["data/file_index"]) == (0, ep)
        assert (row["dataset_from_index"], row["dataset_to_index"]) == (starts[ep], starts[ep + 1])
        assert (row["meta/episodes/chunk_index"], row["meta/episodes/file_index"]) == (0, 0)
        assert row["stats/action/count"] == [ep_len(ep)] and len(row["stats/observation.images.front/mean"]) == 3
    tasks = pq.read_table(three / "meta/tasks.parquet")
    assert tasks["__index_level_0__"].to_pylist() == TASKS and tasks["task_index"].to_pylist() == [0, 1]
    assert b"pandas" in tasks.schema.metadata  # lerobot reads it with pandas: task strings are the index

    stats = json.loads((three / "meta/stats.json").read_text())
    actions = np.concatenate([[make_frame(e, t)["action"].astype(np.float32) for t in range(ep_len(e))]
                              for e in range(3)]).astype(np.float64)
    np.testing.assert_allclose(stats["action"]["mean"], actions.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["action"]["std"], actions.std(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(stats["action"]["min"], actions.min(0))
    assert stats["action"]["count"] == [n] and set(stats["action"]) >= {"q01", "q50", "q99"}
    fronts = np.stack([make_frame(e, t)["observation.images.front"] for e in range(3) for t in range(ep_len(e))])
    np.testing.assert_allclose(np.ravel(stats["observation.images.front"]["mean"]),
                               fronts.reshape(-1, 3).mean(0) / 255, rtol=1e-9)
    assert np.shape(stats["observation.images.front"]["std"]) == (3, 1, 1)
    ds = Dataset(three)
    np.testing.assert_allclose(ds.stats["action"]["std"], stats["action"]["std"], rtol=1e-12)


def test_other_dtypes_scalars_and_file_rollover(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bool/int/(1,)-shaped features round-trip; chunk dirs roll over every `chunks_size` files and the
    episodes metadata moves to a new file every EPISODES_PER_META_FILE episodes (both small here)."""
    from edge_steer.data import writer as writer_mod

    monkeypatch.setattr(writer_mod, "EPISODES_PER_META_FILE", 2)
    spec = DatasetSpec(fps=4, robot_type="toy", features={
        "contact": Feature("bool", (2,)), "phase": Feature("int64", (1,)), "reward": Feature("float32", (1,)),
        "action": Feature("float32", (3,))})
    frames = {ep: [{"contact": np.array([t % 2 == 0, ep % 2 == 1]), "phase": np.int64(t * ep), "reward": t / 7,
                    "action": np.arange(3) + 10.0 * ep + t} for t in range(3 + ep)] for ep in range(5)}
    root = tmp_path / "ds"
    for session in (range(3), range(3, 5)):
        with DatasetWriter(root, spec, chunks_size=2) as w:
            for ep in session:
                w.begin_episode()
                for f in frames[ep]:
                    w.add_frame(f, task="t")
                w.end_episode()
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet"))
    assert files == ["data/chunk-000/file-000.parquet", "data/chunk-000/file-001.parquet",
                     "data/chunk-001/file-000.parquet", "data/chunk-001/file-001.parquet",
                     "data/chunk-002/file-000.parquet", "meta/episodes/chunk-000/file-000.parquet",
                     "meta/episodes/chunk-000/file-001.parquet", "meta/episodes/chunk-001/file-000.parquet",
                     "meta/tasks.parquet"]
    ds = Dataset(root)
    assert ds.num_episodes == 5 and ds.episodes[4].success is None
    for ep in range(5):
        got = ds.episode(ep)
        assert got["contact"].dtype == bool and got["phase"].shape == (3 + ep, 1)
        np.testing.assert_array_equal(got["contact"], [f["contact"] for f in frames[ep]])
        np.testing.assert_array_equal(got["phase"][:, 0], [f["phase"] for f in frames[ep]])
        np.testing.assert_array_equal(got["reward"][:, 0], np.float32([f["reward"] for f in frames[ep]]))
        np.testing.assert_array_equal(got["action"], np.float32([f["action"] for f in frames[ep]]))


def test_bad_extra_is_refused_before_anything_is_written(three: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in three.rglob("*") if p.is_file()}
    with DatasetWriter(three) as w:
        w.begin_episode()
        w.add_frame(make_frame(3, 0), task=TASKS[0])
        with pytest.raises(DatasetError, match="does not fit the earlier episodes"):
            w.end_episode(extra={"seed": "not an int like before"})
        w.abort_episode()
    after = {p: p.stat().st_mtime_ns for p in three.rglob("*") if p.is_file()}
    assert after == before and Dataset(three).num_episodes == 3


def test_append_in_second_session(three: Path) -> None:
    with DatasetWriter(three, default_spec(image_size=SIZE)) as w:
        write_episodes(w, range(3, 4))
    with DatasetWriter(three) as w:  # spec=None: append with the dataset's own spec
        write_episodes(w, range(4, 5))
    ds = Dataset(three)
    assert ds.num_episodes == 5 and ds.tasks == TASKS
    assert (three / "data/chunk-000/file-004.parquet").is_file()
    for ep in range(5):
        assert_episode_intact(ds, ep)
    np.testing.assert_array_equal(ds.sample(np.arange(len(ds)), chunk=1)["frame_index"],
                                  np.concatenate([np.arange(ep_len(e)) for e in range(5)]))
    assert json.loads((three / "meta/info.json").read_text())["total_frames"] == len(ds)


def test_append_rejects_other_spec_and_second_writer(three: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="spec does not match.*fps"):
        DatasetWriter(three, default_spec(image_size=SIZE, fps=30))
    with pytest.raises(DatasetError, match="observation.images.front"):
        DatasetWriter(three, default_spec(image_size=SIZE * 2))
    with DatasetWriter(three), pytest.raises(DatasetError, match="another DatasetWriter"):
        DatasetWriter(three)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError, match="non-empty directory"):
        DatasetWriter(tmp_path / "junk", default_spec())
    with pytest.raises(DatasetError, match="DatasetSpec is needed"):
        DatasetWriter(tmp_path / "new")


# ---- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, match", [
    ("observation.state", np.zeros(7, np.float32), r"observation.state.*shape \(8,\)"),
    ("observation.state", np.array([np.nan] * 8), "observation.state.*NaN"),
    ("action", np.array([np.inf] * 7), "action.*NaN or inf"),
    ("action", np.array(["a"] * 7), "action.*expected float32"),
    ("observation.images.front", np.zeros((SIZE, SIZE, 3), np.float32), "observation.images.front.*uint8"),
    ("observation.images.front", np.zeros((3, SIZE, SIZE), np.uint8), "observation.images.front.*HWC"),
    ("observation.images.wrist", None, r"missing \['observation.images.wrist'\]"),
    ("observation.gripper", np.zeros(1), r"unknown \['observation.gripper'\]"),
])
def test_bad_frames_raise_naming_the_feature(tmp_path: Path, key: str, value, match: str) -> None:
    with DatasetWriter(tmp_path / "ds", default_spec(image_size=SIZE)) as w:
        w.begin_episode()
        frame = make_frame(0, 0)
        if value is None:
            del frame[key]
        else:
            frame[key] = value
        with pytest.raises(DatasetError, match=match):
            w.add_frame(frame, task="x")
        w.abort_episode()


def test_spec_and_writer_misuse(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="int64"):
        from edge_steer.data import validate_frame
        validate_frame(DatasetSpec(10, {"n": Feature("int64", (2,))}), {"n": np.array([1.5, 2.0])})
    with pytest.raises(DatasetError, match="reserved"):
        DatasetSpec(10, {"timestamp": Feature("float32", (1,))})
    with pytest.raises(DatasetError, match="'/'"):
        DatasetSpec(10, {"a/b": Feature("float32", (1,))})
    with pytest.raises(DatasetError, match="unsupported feature dtype"):
        Feature("video", (1,))
    with DatasetWriter(tmp_path / "ds", default_spec(image_size=SIZE)) as w:
        with pytest.raises(DatasetError, match="begin_episode"):
            w.add_frame(make_frame(0, 0), task="x")
        w.begin_episode()
        with pytest.raises(DatasetError, match="empty episode"):
            w.end_episode()
        w.add_frame(make_frame(0, 0), task="x")
        with pytest.raises(DatasetError, match="'length' is reserved"):
            w.end_episode(extra={"length": 3})
        with pytest.raises(DatasetError, match="bool/int/float/str"):
            w.end_episode(extra={"pose": [1, 2]})
        w.abort_episode()
    assert Dataset(tmp_path / "ds").num_episodes == 0


# ---- sampling ----------------------------------------------------------------------------------

def test_chunk_sampling_pads_at_episode_end_and_never_crosses(three: Path) -> None:
    ds = Dataset(three)
    chunk = 4
    batch = ds.sample(np.arange(len(ds)), chunk=chunk)
    n = len(ds)
    assert batch["action"].shape == (n, chunk, 7) and batch["action"].dtype == np.float32
    assert batch["action_is_pad"].shape == (n, chunk) and batch["action_is_pad"].dtype == bool
    assert batch["observation.images.front"].shape == (n, SIZE, SIZE, 3)
    assert batch["observation.state"].shape == (n, 8)
    assert list(batch["task"][:1]) == [TASKS[0]]
    row = 0
    for ep in range(3):
        actions = np.stack([make_frame(ep, t)["action"] for t in range(ep_len(ep))]).astype(np.float32)
        for t in range(ep_len(ep)):
            want = actions[np.minimum(np.arange(t, t + chunk), ep_len(ep) - 1)]
            np.testing.assert_array_equal(batch["action"][row], want)  # padding repeats the last action
            np.testing.assert_array_equal(batch["action_is_pad"][row], np.arange(t, t + chunk) >= ep_len(ep))
            np.testing.assert_array_equal(batch["observation.images.wrist"][row],
                                          make_frame(ep, t)["observation.images.wrist"])
            assert batch["episode_index"][row] == ep and batch["frame_index"][row] == t
            row += 1
    only = ds.sample([0, 1], chunk=2, keys=["observation.state"])
    assert set(only) == {"observation.state", "action", "action_is_pad", "episode_index", "frame_index",
                         "task_index", "task"}
    with pytest.raises(DatasetError, match="must lie in"):
        ds.sample([n], chunk=2)


def test_chunk_sampler_epochs(three: Path) -> None:
    ds = Dataset(three)
    sampler = ChunkSampler(ds, batch_size=4, chunk=3, seed=7)
    seen = np.concatenate([b["episode_index"] * 1000 + b["frame_index"] for b in sampler])
    assert len(seen) == len(ds) == len(set(seen.tolist())) and len(sampler) == -(-len(ds) // 4)
    again = [b["frame_index"] for b in ChunkSampler(ds, batch_size=4, chunk=3, seed=7)]
    first = [b["frame_index"] for b in ChunkSampler(ds, batch_size=4, chunk=3, seed=7)]
    assert all(np.array_equal(a, b) for a, b in zip(again, first, strict=True))


def test_each_png_decoded_once(three: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = reader_mod._LazyImages._decode
    monkeypatch.setattr(reader_mod._LazyImages, "_decode", lambda self, r: calls.append(r) or original(self, r))
    ds = Dataset(three)
    assert calls == []  # opening decodes nothing
    for _ in range(3):
        for _batch in ChunkSampler(ds, batch_size=8, chunk=5):
            pass
    assert len(calls) == 2 * len(ds)


def test_episode_filter(three: Path) -> None:
    with DatasetWriter(three) as w:
        write_episodes(w, range(3, 6))
    by_task = Dataset(three, EpisodeFilter(tasks=TASKS[0]))
    assert [e.index for e in by_task.episodes] == [0, 2, 4]
    five = Dataset(three, EpisodeFilter(success=True, limit=2))
    assert [e.index for e in five.episodes] == [0, 2] and len(five) == ep_len(0) + ep_len(2)
    assert five.stats["action"]["count"][0] == len(five)  # stats of the selected demos
    picked = Dataset(three, EpisodeFilter(episodes=[5, 1]))
    assert [e.index for e in picked.episodes] == [1, 5]
    assert_episode_intact(picked, 5)
    assert set(picked.sample(np.arange(len(picked)), chunk=1)["episode_index"]) == {1, 5}
    with pytest.raises(DatasetError, match="not in this dataset"):
        picked.episode(0)
    with pytest.raises(DatasetError, match=r"episodes \[9\] are not in the dataset"):
        Dataset(three, EpisodeFilter(episodes=[9]))
    with pytest.raises(DatasetError, match=r"tasks \['fly'\] are not in the dataset"):
        Dataset(three, EpisodeFilter(tasks=["fly"]))


# ---- bad datasets ------------------------------------------------------------------------------

def test_clear_errors_for_unreadable_datasets(three: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        Dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="meta/info.json is missing"):
        Dataset(tmp_path / "empty")

    def broken(name: str) -> Path:
        root = tmp_path / name
        shutil.copytree(three, root)
        return root

    root = broken("corrupt_info")
    (root / "meta/info.json").write_text('{"codebase_version": "v3.0", "fps": 1')
    with pytest.raises(DatasetError, match="info.json is corrupt"):
        Dataset(root)
    root = broken("old_version")
    info = json.loads((root / "meta/info.json").read_text())
    (root / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v2.1"}))
    with pytest.raises(DatasetError, match="v2.1 dataset; only v3.0"):
        Dataset(root)
    root = broken("missing_data")
    (root / "data/chunk-000/file-001.parquet").unlink()
    with pytest.raises(DatasetError, match="data file of episode 1 .*file-001.parquet is missing"):
        Dataset(root)
    with pytest.raises(DatasetError, match="missing data files"):
        DatasetWriter(root)
    root = broken("truncated_data")
    path = root / "data/chunk-000/file-002.parquet"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match="file-002.parquet is unreadable"):
        Dataset(root)
    root = broken("missing_episodes_meta")
    shutil.rmtree(root / "meta/episodes")
    with pytest.raises(DatasetError, match="lists 3 episodes but meta/episodes/ has no parquet"):
        Dataset(root)
    root = broken("more_episodes_claimed")
    (root / "meta/info.json").write_text(json.dumps({**info, "total_episodes": 4}))
    with pytest.raises(DatasetError, match="says 4 episodes but the episodes metadata has 3"):
        Dataset(root)
    root = broken("video")
    feats = {**info["features"], "observation.images.front": {"dtype": "video", "shape": [SIZE, SIZE, 3]}}
    (root / "meta/info.json").write_text(json.dumps({**info, "features": feats}))
    with pytest.raises(DatasetError, match="video-backed datasets are not supported"):
        Dataset(root)


# ---- crash safety ------------------------------------------------------------------------------

CHILD = """
import os, sys
sys.path.insert(0, {tests!r})
from test_data import make_frame, write_episodes, ep_len, TASKS, SIZE
from edge_steer.data import DatasetWriter, default_spec, layout, writer
mode = {mode!r}
w = DatasetWriter({root!r}, default_spec(image_size=SIZE))
write_episodes(w, range(2))
if mode == "after_data":   # killed after the data file is renamed into place, before any metadata
    writer.DatasetWriter._write_metadata = lambda *a, **k: os._exit(9)
if mode == "before_info":  # killed after episodes/tasks/stats are renamed, before info.json (the commit)
    real = layout.write_json
    layout.write_json = lambda path, data: os._exit(9) if path.name == "info.json" else real(path, data)
w.begin_episode()
t = 0
while True:
    w.add_frame(make_frame(2, t), task="a brand new task")
    t += 1
    if t == 3:
        print("mid-episode", flush=True)
        if mode != "sigkill":
            w.end_episode(success=True)
"""


def run_child_until_dead(root: Path, mode: str) -> int:
    code = CHILD.format(tests=str(Path(__file__).parent), mode=mode, root=str(root))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        line = proc.stdout.readline()
        if mode == "sigkill":
            assert line == b"mid-episode\n", proc.stderr.read().decode()
            proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("mode", ["sigkill", "after_data", "before_info"])
def test_killed_writer_leaves_complete_episodes_only(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "ds"
    rc = run_child_until_dead(root, mode)
    assert rc == (-signal.SIGKILL if mode == "sigkill" else 9)
    leftover = root / "data/chunk-000/file-002.parquet"
    assert leftover.exists() == (mode != "sigkill")  # the dead episode's data file may be there ...
    (root / "data/chunk-000/.file-003.parquet.tmp").write_bytes(b"torn write")  # ... and a torn temp file

    ds = Dataset(root)  # ... but the dataset shows exactly the two committed episodes
    assert ds.num_episodes == 2 and len(ds) == ep_len(0) + ep_len(1) and ds.tasks == TASKS
    for ep in range(2):
        assert_episode_intact(ds, ep)
    assert ds.stats["action"]["count"][0] == len(ds)

    with DatasetWriter(root) as w:  # the next writer cleans up and appends where the dead one failed
        assert not leftover.exists() and not (root / "data/chunk-000/.file-003.parquet.tmp").exists()
        meta_rows = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").num_rows
        assert meta_rows == 2 and pq.read_table(root / "meta/tasks.parquet").num_rows == 2
        write_episodes(w, range(2, 3))
    ds = Dataset(root)
    assert ds.num_episodes == 3 and ds.tasks == TASKS
    for ep in range(3):
        assert_episode_intact(ds, ep)
    stats = json.loads((root / "meta/stats.json").read_text())
    assert stats["action"]["count"] == [len(ds)]


# ---- lerobot ------------------------------------------------------------------------------------

def test_reads_lerobot_written_fixture() -> None:
    """tests/fixtures/lerobot_v3_tiny was written by lerobot 0.4.4 (see make_fixture.py there)."""
    ds = Dataset(FIXTURE)
    assert ds.num_episodes == 3 and len(ds) == 12 and ds.fps == 5 and ds.spec.robot_type == "toy"
    assert ds.tasks == ["pick the cube", "open the drawer"]
    assert [e.task for e in ds.episodes] == ["pick the cube", "open the drawer", "pick the cube"]
    assert all(e.success is None for e in ds.episodes)
    rng = np.random.default_rng(0)  # replay make_fixture.py's draws
    for ep, n in enumerate([4, 3, 5]):
        got = ds.episode(ep)
        for t in range(n):
            image = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            np.testing.assert_array_equal(got["observation.image"][t], image)
            np.testing.assert_array_equal(got["observation.state"][t], np.array([ep, t, ep * 10 + t], np.float32))
            np.testing.assert_array_equal(got["action"][t], np.array([ep + 0.5, t + 0.25], np.float32))
    batch = ds.sample([3, 4], chunk=3)
    assert batch["action_is_pad"].tolist() == [[False, True, True], [False, False, False]]
    stored = json.loads((FIXTURE / "meta/stats.json").read_text())
    for key in ("action", "observation.state", "observation.image"):
        for s in ("mean", "std", "min", "max"):
            np.testing.assert_allclose(ds.stats[key][s], np.asarray(stored[key][s]), rtol=1e-6, atol=1e-9)


def test_append_to_lerobot_written_dataset(tmp_path: Path) -> None:
    root = tmp_path / "lr"
    shutil.copytree(FIXTURE, root, ignore=shutil.ignore_patterns("*.py"))
    with DatasetWriter(root) as w:
        w.begin_episode()
        for t in range(2):
            w.add_frame({"observation.image": np.full((12, 16, 3), t, np.uint8),
                         "observation.state": np.zeros(3), "action": np.ones(2)}, task="open the drawer")
        assert w.end_episode(success=True) == 3
    ds = Dataset(root)
    assert ds.num_episodes == 4 and len(ds) == 14 and ds.tasks == ["pick the cube", "open the drawer"]
    assert (root / "data/chunk-000/file-001.parquet").is_file()  # lerobot packed episodes 0-2 in file-000
    np.testing.assert_array_equal(ds.episode(3)["observation.image"][1], np.full((12, 16, 3), 1, np.uint8))
    assert ds.episodes[3].success is True and ds.episodes[0].success is None


def _import_lerobot_dataset():
    try:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
    except ImportError:
        pytest.skip("lerobot is not installed (interop is also covered by the lerobot-written fixture)")
    except Exception as e:  # noqa: BLE001 - e.g. a torchvision build that does not match torch
        pytest.skip(f"lerobot is installed but does not import: {e}")
    return LeRobotDataset


def test_lerobot_loads_our_dataset(three: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    LeRobotDataset = _import_lerobot_dataset()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lr = LeRobotDataset("local/edge_steer_test", root=three, delta_timestamps={"action": [i / 10 for i in range(4)]})
    ours = Dataset(three)
    assert len(lr) == len(ours) and lr.num_episodes == 3 and lr.meta.total_tasks == 2
    for i in [0, ep_len(0) - 1, ep_len(0), len(ours) - 1]:
        item, batch = lr[i], ours.sample([i], chunk=4)
        image = (item["observation.images.front"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(image, batch["observation.images.front"][0])
        np.testing.assert_array_equal(item["observation.state"].numpy(), batch["observation.state"][0])
        np.testing.assert_array_equal(item["action"].numpy(), batch["action"][0])
        np.testing.assert_array_equal(item["action_is_pad"].numpy(), batch["action_is_pad"][0])
        assert item["task"] == batch["task"][0]
