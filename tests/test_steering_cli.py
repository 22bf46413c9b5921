"""identify -> finetune (steer, lora, full) -> apply through the CLI, on few-shot demos of a held-out
sim variant (a tiny model stands in for the default one to keep this fast)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from edge_steer.cli import app
from edge_steer.data import Dataset
from edge_steer.models import EdgeVLA
from edge_steer.sim.demos import generate_demos
from edge_steer.sim.env import EnvConfig
from steering_fixtures import tiny_model

runner = CliRunner()
TASK = "purple_cylinder_in_yellow_bowl"   # held-out: a new entity


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer_cli")
    generate_demos(TASK, 2, 0, root / "demos", EnvConfig(image_size=48), workers=1)
    m = tiny_model(language="minilm")
    m.set_stats(Dataset(root / "demos").stats)
    m.save_pretrained(root / "base")
    return root


def _ok(args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def test_identify_finetune_apply_end_to_end(setup):
    root = setup
    out = _ok(["identify", "--model", root / "base", "--demos", root / "demos", "--out", root / "heads.json",
               "--top-k", "3", "--max-frames", "32"])
    assert "selected heads" in out and "Spearman" in out
    doc = json.loads((root / "heads.json").read_text())
    assert len(doc["selected"]) <= 3 and doc["demos"]["tasks"] == ["put the purple cylinder in the yellow bowl"]
    assert set(doc["factors"]) == {"visual", "language", "physical"}   # other instructions come from the registry
    for method in ("steer", "lora", "full"):
        _ok(["finetune", "--model", root / "base", "--demos", root / "demos", "--method", method,
             "--heads", root / "heads.json", "--out", root / method, "--steps", "4", "--batch-size", "4"])
        summary = json.loads((root / method / "finetune.json").read_text())
        assert summary["method"] == method and summary["steps"] == 4
        EdgeVLA.from_pretrained(root / method / "model")
    counts = {m: json.loads((root / m / "finetune.json").read_text())["trainable_params"] for m in ("steer", "lora", "full")}
    assert counts["steer"] < counts["lora"] < counts["full"]
    _ok(["apply", "--model", root / "base", "--steering", root / "steer" / "steering.safetensors",
         "--out", root / "applied"])
    applied = EdgeVLA.from_pretrained(root / "applied")
    tuned = EdgeVLA.from_pretrained(root / "steer" / "model")
    assert all(torch.equal(a, b) for a, b in zip(applied.state_dict().values(), tuned.state_dict().values()))


def test_cli_errors_are_clear(setup):
    root = setup
    res = runner.invoke(app, ["finetune", "--model", str(root / "base"), "--demos", str(root / "demos"),
                              "--method", "steer", "--out", str(root / "x")])
    assert res.exit_code == 2 and "needs --heads" in res.output
    res = runner.invoke(app, ["identify", "--model", str(root / "base"), "--demos", str(root / "nope")])
    assert res.exit_code == 2 and "cannot read demos" in res.output
    other = tiny_model(seed=9)
    other.save_pretrained(root / "other")
    if (root / "steer" / "steering.safetensors").exists():
        res = runner.invoke(app, ["apply", "--model", str(root / "other"), "--steering",
                                  str(root / "steer" / "steering.safetensors"), "--out", str(root / "y")])
        assert res.exit_code == 2 and "trained on base model" in res.output
    res = runner.invoke(app, ["finetune", "--model", str(root / "other"), "--demos", str(root / "demos"),
                              "--method", "steer", "--heads", str(root / "heads.json"), "--out", str(root / "z")])
    assert res.exit_code == 2 and "another model" in res.output
