"""Commands that take demos refuse, before any work and leaving nothing behind, demos that do not fit
the model (state/action dims, cameras, images that do not decode to info.json's size); `tasks list`
prints whole values when it has no wide terminal."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from edge_steer.cli import app
from edge_steer.data import Dataset, DatasetError, DatasetWriter, Feature, default_spec
from edge_steer.data.schema import INFO_PATH, DatasetSpec
from edge_steer.models.interface import check_dataset
from edge_steer.sim.tasks import TASKS
from steering_fixtures import LEFT, tiny_model, write_demos

runner = CliRunner()


def _demos_with_state(root: Path, state_dim: int) -> Path:
    spec = default_spec(image_size=32)
    spec = DatasetSpec(spec.fps, {**spec.features, "observation.state": Feature("float32", (state_dim,))},
                       spec.robot_type)
    rng = np.random.default_rng(0)
    with DatasetWriter(root, spec) as w:
        for _ in range(3):
            w.begin_episode()
            for _ in range(12):
                w.add_frame({"observation.images.front": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                             "observation.images.wrist": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                             "observation.state": rng.normal(0, 0.1, state_dim),
                             "observation.joints": np.zeros(7), "action": rng.normal(0, 0.01, 7)}, task=LEFT)
            w.end_episode(success=True, extra={"task_name": "red_cube_on_blue_plate", "seed": 0})
    return root


def _declare_images(root: Path, size: int) -> Path:
    """info.json claims another image size than the PNGs hold (a hand-edited or mis-converted dataset)."""
    info = json.loads((root / INFO_PATH).read_text())
    for ft in info["features"].values():
        if ft["dtype"] == "image":
            ft["shape"] = [size, size, 3]
    (root / INFO_PATH).write_text(json.dumps(info))
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    tiny_model().save_pretrained(root / "model")
    _demos_with_state(root / "state10", 10)
    _declare_images(_demos_with_state(root / "big", 8), 48)   # says 48 px, holds 32 px
    write_demos(root / "good", episodes_per_task=2)
    (root / "heads.json").write_text(json.dumps({"selected": [{"head": "L1H2", "score": 1.0, "factors": []}]}))
    return root


def _refused(args, root: Path, out: Path, expect: str) -> None:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    assert expect in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert "Traceback" not in res.output
    assert not out.exists(), f"{out} left behind"


@pytest.mark.parametrize("demos,expect", [("state10", "state dim 10 (the model's is 8)"),
                                          ("big", "info.json says (48, 48, 3)")])
def test_commands_that_take_demos_refuse_what_does_not_fit(root, demos, expect):
    d, m = root / demos, root / "model"
    _refused(["finetune", "--model", m, "--demos", d, "--method", "full", "--out", root / "ft", "--steps", "2"],
             root, root / "ft", expect)
    _refused(["finetune", "--model", m, "--demos", d, "--method", "steer", "--heads", root / "heads.json",
              "--out", root / "ft"], root, root / "ft", expect)
    _refused(["identify", "--model", m, "--demos", d, "--out", root / "heads_out.json"], root,
             root / "heads_out.json", expect)
    _refused(["identify", "--model", m, "--demos", root / "good", "--baseline", d, "--out", root / "heads_out.json"],
             root, root / "heads_out.json", expect)
    _refused(["report", "--model", m, "--demos", d, "--heads", root / "heads.json", "--out", root / "rep"],
             root, root / "rep", expect)


def test_pretrain_refuses_demos_of_another_robot(root):
    _refused(["pretrain", "--data", root / "state10", "--out", root / "pre", "--steps", "1", "--language",
              "embedding", "--eval-episodes", "0"], root, root / "pre", "state dim 10 (the model's is 8)")


def test_replay_refuses_images_that_do_not_match_info_json(root):
    res = runner.invoke(app, ["demos", "replay", "--data", str(root / "big"), "--episode", "0"])
    assert res.exit_code == 2 and "info.json says (48, 48, 3)" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


def test_check_dataset_names_each_mismatch(root):
    m = tiny_model()
    check_dataset(m, Dataset(root / "good"))   # fits: no error
    with pytest.raises(DatasetError, match="action dim 7 .the model's is 6."):
        check_dataset(tiny_model(action_dim=6), Dataset(root / "good"))
    with pytest.raises(DatasetError, match=r"lack \['observation.images.side'\]"):
        check_dataset(tiny_model(cameras=("front", "side")), Dataset(root / "good"))
    with pytest.raises(DatasetError, match="observation.images.front: image of dataset row 0 is"):
        check_dataset(m, Dataset(root / "big"))


def test_tasks_list_prints_whole_values_when_piped():
    res = runner.invoke(app, ["tasks", "list"])
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert "…" not in res.output and lines[0].split() == ["name", "split", "factor", "instruction", "environment"]
    assert len(lines) == 1 + len(TASKS)
    for t, line in zip(TASKS.values(), lines[1:]):
        assert line.startswith(t.name + " ") and t.instruction in line and f"{t.env.lighting} light" in line


def test_a_damaged_frame_past_the_first_is_refused_in_one_line(root, tmp_path):
    """Only each episode's first frame is checked up front; a bad one further in still ends in one line."""
    d = tmp_path / "damaged"
    shutil.copytree(root / "good", d)
    path = d / "data/chunk-000/file-000.parquet"
    t = pq.read_table(path)
    col = t.column("observation.images.front").to_pylist()
    small = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(small, format="PNG")
    col[5] = {"bytes": small.getvalue(), "path": None}
    i = t.column_names.index("observation.images.front")
    pq.write_table(t.set_column(i, "observation.images.front", pa.array(col, t.schema.field(i).type)), path)
    _refused(["identify", "--model", root / "model", "--demos", d, "--out", tmp_path / "h.json", "--max-frames", "64"],
             root, tmp_path / "h.json", "is (16, 16, 3), info.json says (32, 32, 3)")
