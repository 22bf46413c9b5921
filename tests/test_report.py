"""The explanation report: figures, summary, attention maps, and refusing another model's heads file."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_steer.data import Dataset
from edge_steer.models.heads import HeadRef
from edge_steer.steering.identify import IdentifyConfig, IdentifyError, identify, probe_set
from edge_steer.steering.report import (
    ReportError,
    decision_attention,
    instruction_tokens,
    score_panels,
    write_report,
)
from steering_fixtures import RIGHT, task_demos, tiny_model, write_demos


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An untrained tiny model is enough: the report explains whatever identify found, and training
    (the planted model) would cost most of this file's time budget."""
    root = tmp_path_factory.mktemp("report")
    data = write_demos(root / "demos", episodes_per_task=3, length=10)
    model = tiny_model()
    model.set_stats(Dataset(data).stats)
    model.eval()
    doc = identify(model, probe_set(model, task_demos(data), other_instructions=[RIGHT]), IdentifyConfig(top_k=2))
    out = root / "report"
    md = write_report(doc, model, Dataset(data), out, n_frames=2)
    return model, doc, data, out, md


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_report_writes_valid_figures(setup):
    _, doc, _, out, md = setup
    assert md == out / "report.md"
    heads = [s["head"] for s in doc["selected"]]
    assert heads
    for name in ["heatmap.png"] + [f"attention_{h}.png" for h in heads]:
        px = _png(out / name)
        assert px.shape[0] >= 200 and px.shape[1] >= 400, name
        assert px.std() > 5 and len(np.unique(px.reshape(-1, 3), axis=0)) > 50, f"{name} looks blank"


def test_summary_names_heads_factors_and_figures(setup):
    _, doc, _, out, md = setup
    text = md.read_text()
    for s in doc["selected"]:
        assert s["head"] in text
        assert f"attention_{s['head']}.png" in text
        for f in s["factors"]:
            assert f in text
    for word in ("heatmap.png", "Spearman", "visual", "language", "physical", "Clean action error"):
        assert word in text


def test_decision_attention_rows_sum_to_one_and_flag_is_reset(setup):
    model, _, data, _, _ = setup
    ds = Dataset(data)
    inputs = model.prepare(ds.sample(np.arange(3), chunk=model.config.chunk))
    heads = [HeadRef(0, 1), HeadRef(1, 3)]
    maps = decision_attention(model, inputs, heads)
    layout = model.token_layout()
    n_tokens = layout["decision"].stop
    for h in heads:
        w = maps[h]
        assert w.shape == (3, n_tokens)
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
        pad = ~inputs["lang_mask"].numpy()
        assert np.all(w[:, layout["instruction"]][pad] == 0)      # padding is never attended to
    for block in model.blocks:
        assert block.attn.keep_attention is False and block.attn.last_attention is None


def test_keep_attention_is_reset_after_the_report(setup):
    model, *_ = setup
    assert all(b.attn.keep_attention is False and b.attn.last_attention is None for b in model.blocks)


def test_wrong_model_heads_file_is_refused(setup, tmp_path):
    _, doc, data, _, _ = setup
    other = tiny_model(seed=1)
    with pytest.raises(IdentifyError, match="another model"):
        write_report(doc, other, Dataset(data), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_missing_scores_fall_back_to_attribution_estimates(setup):
    _, doc, *_ = setup
    d = copy.deepcopy(doc)
    d["scores"]["patching"] = {}
    d["scores"]["ablation"] = None
    d["scores"]["probe"][0][0] = None              # a null entry plots as "not scored"
    titles = [p.title for p in score_panels(d)]
    assert titles[0] == "mean ablation (attribution est.)"
    assert "language (attribution est.)" in titles
    probe = next(p for p in score_panels(d) if p.kind == "r2")
    assert np.isnan(probe.values[0, 0])
    d["scores"]["probe"] = [[0.0]]
    with pytest.raises(ReportError, match="layers x"):
        score_panels(d)


def test_instruction_labels_are_tokens_or_positions(setup):
    model, *_ = setup
    toks = instruction_tokens(model.encoder, "push the block to the left", model.config.max_lang_tokens)
    assert len(toks) == model.config.max_lang_tokens
    assert "push" in toks and "left" in toks

    class Opaque:
        pass

    assert instruction_tokens(Opaque(), "push", 3) == ["#0", "#1", "#2"]


def test_cli_report_and_its_refusal(setup, tmp_path):
    import json

    from typer.testing import CliRunner

    from edge_steer.cli import app

    model, doc, data, _, _ = setup
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "heads.json").write_text(json.dumps(doc))
    runner = CliRunner()
    args = ["report", "--heads", tmp_path / "heads.json", "--demos", data, "--frames", "1"]
    res = runner.invoke(app, [str(a) for a in args + ["--model", tmp_path / "model", "--out", tmp_path / "r"]])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "report.md").is_file() and (tmp_path / "r" / "heatmap.png").is_file()
    tiny_model(seed=1).save_pretrained(tmp_path / "other")
    res = runner.invoke(app, [str(a) for a in args + ["--model", tmp_path / "other", "--out", tmp_path / "r2"]])
    assert res.exit_code == 2 and "another model" in res.output


def test_report_of_a_keypoint_model_maps_patches_and_bars_the_keypoint_tokens(setup, tmp_path):
    """A camera's tokens are its patches and then its keypoint token (the shipped default has them):
    the attention map shows the patches on the image, the keypoint tokens go with the bars."""
    _, _, data, _, _ = setup
    model = tiny_model(keypoints=4)
    model.set_stats(Dataset(data).stats)
    model.eval()
    doc = identify(model, probe_set(model, task_demos(data), other_instructions=[RIGHT]), IdentifyConfig(top_k=1))
    write_report(doc, model, Dataset(data), tmp_path / "r", n_frames=1)
    px = _png(tmp_path / "r" / f"attention_{doc['selected'][0]['head']}.png")
    assert px.std() > 5
