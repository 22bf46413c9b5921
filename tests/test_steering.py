"""Robotic Steering core: identification finds a planted head, steer fine-tuning touches exactly the
selected slices, LoRA counts match peft, grouped-query heads, steering-delta round trip, bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from edge_steer.data import Dataset, DatasetWriter, default_spec
from edge_steer.models.heads import HeadRef
from edge_steer.steering.delta import DeltaError, SteeringDelta
from edge_steer.steering.finetune import (
    FinetuneConfig, FinetuneError, finetune, head_slices, lora_config, save_result, with_train,
)
from edge_steer.steering.identify import (
    IdentifyConfig, IdentifyError, identify, probe_set, select_heads, selected_heads, spearman, topk_overlap,
)
from steering_fixtures import LEFT, PLANTED, RIGHT, planted_model, task_demos, tiny_model, write_demos


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    return write_demos(tmp_path_factory.mktemp("steer") / "demos", episodes_per_task=4, length=10)


@pytest.fixture(scope="module")
def planted(demos):
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a loaded 2-core box
    m = planted_model(demos, steps=80)
    assert m.final_loss < 0.6, "the planted model did not learn the instruction"
    return m


@pytest.fixture(scope="module")
def identified(planted, demos):
    ps = probe_set(planted, task_demos(demos), max_frames=48, other_instructions=[RIGHT])
    return identify(planted, ps, IdentifyConfig(top_k=2, batch_size=48))


def _quick(method, steps=12, **kw):
    return with_train(FinetuneConfig(method=method, **kw), steps=steps, batch_size=8, checkpoint_every=steps,
                      bf16=False, warmup=2)


# --- identification ----------------------------------------------------------------------------------
def test_every_method_ranks_the_planted_head_first(identified):
    s = identified["scores"]
    # (attribution of the language swap is not asserted: flipping the instruction is a large change,
    # beyond what a first-order estimate of an L1 error tracks; exact patching labels the factors)
    for name, grid in [("ablation", s["ablation"]), ("attribution", s["attribution"]["ablation"]),
                       ("language patching", s["patching"]["language"]),
                       ("patching", np.sum([s["patching"][f] for f in s["patching"]], 0))]:
        g = np.asarray(grid)
        assert np.unravel_index(np.argmax(g), g.shape) == (PLANTED.layer, PLANTED.head), name
    top = identified["selected"][0]
    assert (top["layer"], top["index"]) == (PLANTED.layer, PLANTED.head)
    # it carries the instruction, not the (noise) images or state
    assert top["factors"] == ["language"]
    lang = np.asarray(s["patching"]["language"])[PLANTED.layer, PLANTED.head]
    assert lang > 10 * max(np.asarray(s["patching"][f])[PLANTED.layer, PLANTED.head] for f in ("visual", "physical"))


def test_heads_file_records_what_identify_did(identified, planted):
    assert identified["model_fingerprint"] == planted.fingerprint()
    assert identified["method"] == "attribution" and identified["demos"]["tasks"] == [LEFT]
    assert set(identified["factors"]) == {"visual", "language", "physical"}
    assert identified["timing"]["attribution_passes"] * 4 < identified["timing"]["exhaustive_passes"]
    json.dumps(identified)  # serialisable as is
    assert selected_heads(identified, planted)[0] == PLANTED
    with pytest.raises(IdentifyError, match="another model"):
        selected_heads(identified, tiny_model(seed=5))


def test_attribution_matches_exact_patching_on_a_linear_readout():
    # Attribution is first order: on a head whose effect is linear in its output it is exact.
    a = np.array([[0.0, 3.0], [1.0, 2.0]])
    assert spearman(a, a * 2 + 1) == pytest.approx(1.0)
    assert topk_overlap(a, a, 2) == 1.0 and topk_overlap(a, -a, 1) == 0.0


def test_selection_by_coverage_and_no_zero_effect_heads():
    rank = np.array([[0.5, 0.0, 0.2], [0.3, -0.1, 0.0]])
    assert select_heads(rank, top_k=10) == [HeadRef(0, 0), HeadRef(1, 0), HeadRef(0, 2)]
    assert select_heads(rank, coverage=0.5) == [HeadRef(0, 0)]
    assert select_heads(rank, coverage=0.8) == [HeadRef(0, 0), HeadRef(1, 0)]
    with pytest.raises(IdentifyError, match="no head"):
        select_heads(np.zeros((2, 2)))


def test_identify_refuses_demos_of_another_robot(tmp_path, planted):
    m = tiny_model(state_dim=6)
    with pytest.raises(IdentifyError, match="state dim 8 .the model.s is 6."):
        probe_set(m, Dataset(write_demos(tmp_path / "d", episodes_per_task=1, length=10)))
    short = tmp_path / "short"
    with DatasetWriter(short, default_spec(image_size=32)) as w:
        w.begin_episode()
        for _ in range(3):
            w.add_frame({"observation.images.front": np.zeros((32, 32, 3), np.uint8),
                         "observation.images.wrist": np.zeros((32, 32, 3), np.uint8),
                         "observation.state": np.zeros(8), "observation.joints": np.zeros(7),
                         "action": np.zeros(7)}, task=LEFT)
        w.end_episode()
    with pytest.raises(IdentifyError, match="at least"):
        probe_set(planted, Dataset(short))


def test_grouped_query_heads_identify_and_steer(tmp_path, demos):
    m = tiny_model(n_heads=4, n_kv_heads=2)
    m.set_stats(Dataset(demos).stats)
    ps = probe_set(m, task_demos(demos), max_frames=16, other_instructions=[RIGHT])
    doc = identify(m, ps, IdentifyConfig(top_k=2, batch_size=16, exact=False))
    assert np.asarray(doc["scores"]["attribution"]["ablation"]).shape == (2, 4)
    # q-only steering of head 1 leaves the k/v rows it shares with head 0 alone ...
    sl = head_slices(m, [HeadRef(0, 1)], "qkvo")
    kv = [s for s in sl if ".k_proj." in s.param or ".v_proj." in s.param]
    assert all((s.start, s.stop) == (0, 8) for s in kv)          # kv head 0 = rows 0..8
    res = finetune(m, task_demos(demos), _quick("steer"), tmp_path / "gqa", heads=[HeadRef(0, 1)])
    changed = _changed(m, res.model)
    assert not any(".k_proj." in n or ".v_proj." in n for n in changed)
    # ... and qkvo steering trains them, shared by both heads of the group
    res = finetune(m, task_demos(demos), _quick("steer", slices="qkvo"), tmp_path / "gqa2", heads=[HeadRef(0, 1)])
    assert any(".k_proj.weight" in n for n in _changed(m, res.model))


# --- fine-tuning -------------------------------------------------------------------------------------
def _changed(a, b) -> dict[str, torch.Tensor]:
    sa, sb = a.state_dict(), b.state_dict()
    return {k: sa[k] != sb[k] for k in sa if not torch.equal(sa[k], sb[k])}


def test_steer_changes_exactly_the_selected_slices(tmp_path, planted, demos):
    heads = [PLANTED, HeadRef(0, 1)]
    before = copy.deepcopy(planted.state_dict())
    res = finetune(planted, task_demos(demos), _quick("steer"), tmp_path, heads=heads)
    assert all(torch.equal(before[k], v) for k, v in planted.state_dict().items()), "the base was modified"
    allowed = {}
    for s in head_slices(planted, heads, "qo"):
        m = allowed.setdefault(s.param, torch.zeros_like(before[s.param], dtype=torch.bool))
        m.narrow(s.dim, s.start, s.stop - s.start).fill_(True)
    changed = _changed(planted, res.model)
    assert changed, "nothing trained"
    for name, diff in changed.items():
        assert name in allowed, f"{name} changed but belongs to no selected slice"
        assert not (diff & ~allowed[name]).any(), f"{name} changed outside the selected rows/columns"
    assert res.trainable_params == sum(m.sum().item() for m in allowed.values())
    # the planted head's output columns are among what trained
    assert f"blocks.{PLANTED.layer}.attn.o_proj.weight" in changed


def test_steer_can_train_a_named_module_whole_and_the_delta_carries_it(tmp_path, planted, demos):
    res = finetune(planted, task_demos(demos), _quick("steer", whole=("stem.0",)), tmp_path / "run", heads=[PLANTED])
    stem = {n: p for n, p in planted.named_parameters() if n.startswith("stem.0.")}
    assert stem, "the tiny model has no stem.0"
    changed = _changed(planted, res.model)
    assert set(stem) <= set(changed), "the first conv layer did not train"
    assert set(changed) - set(stem) <= {s.param for s in head_slices(planted, [PLANTED], "qo")}
    hd, d = planted.config.head_dim, planted.config.d_model
    assert res.trainable_params == hd * d + hd + d * hd + sum(p.numel() for p in stem.values())
    paths = save_result(res, tmp_path / "run")
    steered = SteeringDelta.load(paths["steering"]).apply_(copy.deepcopy(planted))
    assert steered.fingerprint() == res.model.fingerprint()
    with pytest.raises(FinetuneError, match="no module 'stem.9'"):
        finetune(planted, task_demos(demos), _quick("steer", whole=("stem.9",)), tmp_path / "bad", heads=[PLANTED])
    # no heads: the module alone trains (the control arm that asks what the heads add), and ships as a delta
    alone = finetune(planted, task_demos(demos), _quick("steer", whole=("stem.0",)), tmp_path / "alone", heads=[])
    assert set(_changed(planted, alone.model)) == set(stem)
    assert alone.trainable_params == sum(p.numel() for p in stem.values())
    paths = save_result(alone, tmp_path / "alone")
    assert SteeringDelta.load(paths["steering"]).apply_(copy.deepcopy(planted)).fingerprint() == alone.model.fingerprint()


def test_optimizer_state_only_for_the_slices(tmp_path, planted, demos):
    res = finetune(planted, task_demos(demos), _quick("steer", steps=4), tmp_path, heads=[PLANTED])
    ckpt = torch.load(next((tmp_path / "checkpoints").glob("step_*.pt")), weights_only=False)
    state = ckpt["optim"]["state"]
    assert sum(v["exp_avg"].numel() for v in state.values()) == res.trainable_params
    hd, d = planted.config.head_dim, planted.config.d_model
    assert res.trainable_params == hd * d + hd + d * hd          # q rows + q bias + o columns


def test_lora_counts_match_peft(tmp_path, planted, demos):
    from peft import get_peft_model
    cfg = _quick("lora", lora_rank=4)
    res = finetune(planted, task_demos(demos), cfg, tmp_path)
    peft_trainable, _ = get_peft_model(copy.deepcopy(planted), lora_config(cfg, planted)).get_nb_trainable_parameters()
    assert res.trainable_params == peft_trainable
    c = planted.config
    assert peft_trainable == c.n_layers * 4 * 4 * (c.d_model + c.n_heads * c.head_dim)
    # merged back into plain Linear layers, same parameter names as the base
    assert set(res.model.state_dict()) == set(planted.state_dict())
    assert _changed(planted, res.model)


def test_full_finetune_trains_everything_and_nan_is_an_error(tmp_path, planted, demos):
    res = finetune(planted, task_demos(demos), _quick("full", steps=3), tmp_path / "full")
    assert res.trainable_params == sum(p.numel() for p in planted.parameters())
    with pytest.raises(FloatingPointError, match="loss became"):
        finetune(planted, task_demos(demos), with_train(_quick("full", steps=3), lr=1e30), tmp_path / "nan")
    with pytest.raises(FinetuneError, match="needs selected heads"):
        finetune(planted, task_demos(demos), _quick("steer"), tmp_path / "x")
    with pytest.raises(FinetuneError, match="no heads"):
        finetune(planted, task_demos(demos), _quick("steer"), tmp_path / "y", heads=[HeadRef(7, 0)])


def test_delta_round_trip_reproduces_the_finetuned_model(tmp_path, planted, demos):
    res = finetune(planted, task_demos(demos), _quick("steer"), tmp_path / "run", heads=[PLANTED],
                   heads_doc={"selected": [{"head": str(PLANTED)}]})
    paths = save_result(res, tmp_path / "run")
    delta = SteeringDelta.load(paths["steering"])
    assert delta.heads["selected"][0]["head"] == str(PLANTED)
    steered = delta.apply_(copy.deepcopy(planted))
    assert steered.fingerprint() == res.model.fingerprint()
    batch = Dataset(demos).sample(np.arange(6), chunk=planted.config.chunk)
    with torch.no_grad():
        a = res.model(**res.model.prepare(batch))
        b = steered(**steered.prepare(batch))
    assert torch.equal(a, b)
    # refused: another base model, a corrupted file
    with pytest.raises(DeltaError, match="trained on base model"):
        delta.apply_(tiny_model(seed=3))
    raw = bytearray((tmp_path / "run" / "steering.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    with pytest.raises(DeltaError):
        SteeringDelta.load(tmp_path / "bad.safetensors")
    with pytest.raises(DeltaError, match="no steering delta"):
        SteeringDelta.load(tmp_path / "missing.safetensors")
