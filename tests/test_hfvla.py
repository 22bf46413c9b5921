"""HFVLA: the steering pipeline on VLAs built from transformers modules (tiny random configs, offline).

Per backbone family (BERT shaped like MiniLM, Llama, Qwen2 with grouped-query attention, Gemma), each
with a SigLIP vision tower: a head planted as the only path from the instruction to the action is ranked
first by ablation, attribution and patching; steer changes exactly the selected slices; LoRA counts
equal peft's; the delta round trip is bitwise; heads files and deltas of another base are refused.
Fused projections (Phi-3 qkv_proj, GPT-2 c_attn) are steered slice-exactly on the bare transformers
modules, and the CLI runs pretrain -> identify -> finetune -> report -> apply on an HFVLA.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from edge_steer.data import Dataset  # noqa: E402
from edge_steer.models import CheckpointError, load_model  # noqa: E402
from edge_steer.models.configuration_hfvla import TowerError, backbone_tower, vision_tower  # noqa: E402
from edge_steer.models.heads import HeadRef  # noqa: E402
from edge_steer.models.interface import VLAPolicy  # noqa: E402
from edge_steer.models.locate import locate_heads  # noqa: E402
from edge_steer.models.modeling_hfvla import HFVLA  # noqa: E402
from edge_steer.steering.delta import DeltaError, SteeringDelta  # noqa: E402
from edge_steer.steering.finetune import (  # noqa: E402
    FinetuneConfig, SteerParams, finetune, head_slices, lora_config, save_result, with_train)
from edge_steer.steering.identify import IdentifyConfig, IdentifyError, identify, probe_set, selected_heads  # noqa: E402
from steering_fixtures import PLANTED, RIGHT, one_torch_thread, plant, task_demos, write_demos  # noqa: E402,F401

FAMILIES = ("tiny-bert", "tiny-llama", "tiny-qwen2", "tiny-gemma")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_hf(backbone: str = "tiny-llama", vision: str = "tiny-siglip", seed: int = 0, **kw) -> HFVLA:
    torch.manual_seed(seed)
    return HFVLA.create(backbone_tower(backbone), vision_tower(vision), chunk=4, max_lang_tokens=8,
                        augment_shift=0, **kw).eval()


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    return write_demos(tmp_path_factory.mktemp("hf") / "demos", episodes_per_task=4, length=10)


@pytest.fixture(scope="module", params=FAMILIES)
def planted(request, demos):
    m = plant(tiny_hf(request.param), demos, steps=80)
    assert m.final_loss < 0.6, f"{request.param}: the planted model did not learn the instruction"
    return m


def _quick(method, steps=6, **kw):
    return with_train(FinetuneConfig(method=method, **kw), steps=steps, batch_size=8, checkpoint_every=steps,
                      bf16=False, warmup=2)


def _changed(a, b) -> dict[str, torch.Tensor]:
    sa, sb = a.state_dict(), b.state_dict()
    return {k: sa[k] != sb[k] for k in sa if not torch.equal(sa[k], sb[k])}


def test_every_family_is_a_policy_with_located_heads():
    for name, n_kv in (("tiny-bert", 4), ("tiny-llama", 4), ("tiny-qwen2", 2), ("tiny-gemma", 1)):
        m = tiny_hf(name)
        assert isinstance(m, VLAPolicy)
        heads = m.heads()
        assert len(heads) == 2 * 4 and len({h.kv_head for h in heads}) == n_kv
        assert heads == locate_heads(m)            # the pipeline's heads are the locator's
        assert all(h.hook.startswith("backbone.") for h in heads)


@pytest.mark.parametrize("vision", ["tiny-siglip", "tiny-vit", "tiny-clip"])
def test_forward_stages_attention_maps_and_predict(vision):
    m = tiny_hf("tiny-qwen2", vision)
    g = torch.Generator().manual_seed(0)
    inputs = {"images": torch.rand(2, 2, 3, 32, 32, generator=g) * 2 - 1, "state": torch.randn(2, 8, generator=g),
              "lang": torch.randint(0, 500, (2, 8), generator=g),
              "lang_mask": torch.tensor([[True] * 5 + [False] * 3] * 2)}
    with torch.no_grad():
        out = m(**inputs)
        x, mask = m.embed(**inputs)
        staged = m.readout(m.trunk(m.trunk(x, mask, 0, 1), mask, 1))
    assert out.shape == (2, 4, 7) and torch.allclose(out, staged, atol=1e-6)
    maps = m.attention_maps(inputs, {1})
    assert maps[1].shape == (2, 4, x.shape[1], x.shape[1])
    assert torch.allclose(maps[1].sum(-1), torch.ones(2, 4, x.shape[1]), atol=1e-5)
    assert float(maps[1][:, :, :, 5:8].abs().max()) == 0.0          # padded instruction tokens are masked
    assert m.backbone.config._attn_implementation == "sdpa"          # eager only for that forward
    obs = {"observation.images.front": np.zeros((48, 48, 3), np.uint8),
           "observation.images.wrist": np.zeros((48, 48, 3), np.uint8), "observation.state": np.zeros(8, np.float32)}
    assert m.predict(obs, "push the block to the left").shape == (4, 7)


def test_save_load_is_exact_and_load_model_dispatches(tmp_path):
    m = tiny_hf("tiny-gemma", backbone_layers=1)
    assert len(m.heads()) == 4 and m.config.n_layers == 1
    m.save_pretrained(tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert isinstance(back, HFVLA) and back.fingerprint() == m.fingerprint()
    assert back.encoder(["push it"])[0].tolist() == m.encoder(["push it"])[0].tolist()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="checksum"):
        load_model(tmp_path / "m")


def test_towers_from_directories_and_clear_errors(tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                   num_hidden_layers=3, vocab_size=300)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "lm")     # a causal LM: its base model is used
    m = HFVLA.create(backbone_tower(str(tmp_path / "lm")), vision_tower("tiny-siglip"), backbone_layers=2, chunk=4)
    assert m.config.n_layers == 2 and len(m.heads()) == 8
    src = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "lm").model.layers[0].self_attn.q_proj.weight
    assert torch.equal(m.backbone.layers[0].self_attn.q_proj.weight, src)      # pretrained weights, not random
    with pytest.raises(TowerError, match="no such directory.*supported backbones"):
        backbone_tower(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TowerError, match="not a transformers model"):
        backbone_tower(str(tmp_path / "empty"))
    transformers.GPT2Config(n_embd=32, n_head=4, n_layer=1).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(TowerError, match="'gpt2' is not supported.*bert, gemma, llama"):
        backbone_tower(str(tmp_path / "gpt2"))
    with pytest.raises(TowerError, match="has 3 layers"):
        HFVLA.create(backbone_tower(str(tmp_path / "lm")), vision_tower("tiny-siglip"), backbone_layers=5)


# --- identification and fine-tuning on each family ----------------------------------------------------
def test_planted_head_ranks_first_and_steering_is_slice_exact(tmp_path, planted, demos):
    ps = probe_set(planted, task_demos(demos), max_frames=48, other_instructions=[RIGHT])
    # the mean-ablation baseline holds both instructions: over the one task's frames the planted head's
    # mean would still carry that task's instruction
    both = probe_set(planted, Dataset(demos), max_frames=48)
    doc = identify(planted, ps, IdentifyConfig(top_k=2, batch_size=48), baseline=both)
    s = doc["scores"]
    # (the probe is not asserted: heads that write nothing still read the instruction, so their
    # activations predict the action as well; the probe measures what is decodable, not what is used)
    for name, grid in [("ablation", s["ablation"]), ("attribution", s["attribution"]["ablation"]),
                       ("language patching", s["patching"]["language"]),
                       ("patching", np.sum([s["patching"][f] for f in s["patching"]], 0))]:
        g = np.asarray(grid)
        assert np.unravel_index(np.argmax(g), g.shape) == (PLANTED.layer, PLANTED.head), name
    assert doc["selected"][0]["factors"] == ["language"]
    assert selected_heads(doc, planted)[0] == PLANTED
    assert doc["timing"]["attribution_passes"] * 4 < doc["timing"]["exhaustive_passes"]

    # steer: exactly the q rows and o columns of the selected heads change, the base stays as it was
    heads = [PLANTED, HeadRef(0, 1)]
    before = copy.deepcopy(planted.state_dict())
    res = finetune(planted, task_demos(demos), _quick("steer"), tmp_path / "steer", heads=heads, heads_doc=doc)
    assert all(torch.equal(before[k], v) for k, v in planted.state_dict().items()), "the base was modified"
    allowed = {}
    for sl in head_slices(planted, heads, "qo"):
        mk = allowed.setdefault(sl.param, torch.zeros_like(before[sl.param], dtype=torch.bool))
        mk.narrow(sl.dim, sl.start, sl.stop - sl.start).fill_(True)
    changed = _changed(planted, res.model)
    assert changed, "nothing trained"
    for name, diff in changed.items():
        assert name in allowed and not (diff & ~allowed[name]).any(), f"{name} changed outside the selected slices"
    assert res.trainable_params == sum(int(mk.sum()) for mk in allowed.values())
    ckpt = torch.load(next((tmp_path / "steer" / "checkpoints").glob("step_*.pt")), weights_only=False)
    assert sum(v["exp_avg"].numel() for v in ckpt["optim"]["state"].values()) == res.trainable_params

    # the delta, keyed by parameter name, reproduces the fine-tuned model bitwise on its base only
    paths = save_result(res, tmp_path / "steer")
    delta = SteeringDelta.load(paths["steering"])
    assert all(name.startswith("backbone.") for name, _ in delta.tensors)
    steered = delta.apply_(copy.deepcopy(planted))
    assert steered.fingerprint() == res.model.fingerprint()
    other = tiny_hf("tiny-llama", seed=7)
    with pytest.raises(DeltaError, match="trained on base model"):
        delta.apply_(other)
    with pytest.raises(IdentifyError, match="another model"):
        selected_heads(doc, other)

    # LoRA on the family's attention projections, as many parameters as peft gives itself
    from peft import get_peft_model
    cfg = _quick("lora", steps=2, lora_rank=4)
    lora = finetune(planted, task_demos(demos), cfg, tmp_path / "lora")
    peft_n, _ = get_peft_model(copy.deepcopy(planted), lora_config(cfg, planted)).get_nb_trainable_parameters()
    assert lora.trainable_params == peft_n > 0
    bb = planted.backbone.config
    hd = bb.hidden_size // bb.num_attention_heads if planted.config.family == "bert" else planted.heads()[0].head_dim
    q_out, kv_out = bb.num_attention_heads * hd, getattr(bb, "num_key_value_heads", bb.num_attention_heads) * hd
    d = bb.hidden_size
    per_layer = 4 * ((d + q_out) + 2 * (d + kv_out) + (q_out + d))      # r * (in + out) of q, k, v, o
    assert peft_n == bb.num_hidden_layers * per_layer
    assert set(lora.model.state_dict()) == set(planted.state_dict()) and _changed(planted, lora.model)


@pytest.mark.parametrize("family", ["phi3", "gpt2"])
def test_fused_projections_are_steered_slice_exactly(family):
    torch.manual_seed(0)
    if family == "phi3":
        cfg = transformers.Phi3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                      num_hidden_layers=2, vocab_size=100, pad_token_id=0)
        model = transformers.Phi3Model(cfg)
        fused = "layers.1.self_attn.qkv_proj.weight"
    else:
        model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=100,
                                                               n_positions=16))
        fused = "h.1.attn.c_attn.weight"
    heads = {h.ref: h for h in locate_heads(model)}
    chosen = [HeadRef(1, 2)]
    slices = [s for r in chosen for s in heads[r].slices("qo")]
    before = copy.deepcopy(model.state_dict())
    steer = SteerParams(model, slices)
    opt = torch.optim.Adam(steer.parameters(), lr=1e-2)
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    for _ in range(2):
        loss = model(input_ids=ids).last_hidden_state.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    steer.remove()
    allowed = {}
    for sl in slices:
        mk = allowed.setdefault(sl.param, torch.zeros_like(before[sl.param], dtype=torch.bool))
        mk.narrow(sl.dim, sl.start, sl.stop - sl.start).fill_(True)
    after = model.state_dict()
    changed = {k: before[k] != after[k] for k in before if not torch.equal(before[k], after[k])}
    assert fused in changed, "the fused projection's q part did not train"
    for name, diff in changed.items():
        assert name in allowed and not (diff & ~allowed[name]).any(), f"{name} changed outside the head's slices"
    # the q part of the fused weight is exactly head 2's block: q rows 16..24 (Phi-3) / columns 16..24 (GPT-2)
    q = heads[chosen[0]].q[0]
    assert (q.param, q.start, q.stop) == (fused, 16, 24) and q.dim == (0 if family == "phi3" else 1)
    assert sum(p.numel() for p in steer.parameters()) == sum(int(mk.sum()) for mk in allowed.values())


# --- the CLI on an HFVLA -----------------------------------------------------------------------------
def test_cli_pretrain_identify_finetune_report_apply(tmp_path, demos):
    from typer.testing import CliRunner

    from edge_steer.cli import app
    run = CliRunner()

    def ok(*args):
        r = run.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r.output

    ok("pretrain", "--data", demos, "--out", tmp_path / "run", "--steps", 3, "--batch-size", 8,
       "--eval-episodes", 0, "--backbone", "tiny-qwen2", "--vision", "tiny-siglip", "--backbone-layers", 1)
    model = tmp_path / "run" / "model"
    assert isinstance(load_model(model), HFVLA)
    ok("identify", "--model", model, "--demos", demos, "--out", tmp_path / "heads.json", "--top-k", 2,
       "--max-frames", 16)
    doc = json.loads((tmp_path / "heads.json").read_text())
    assert doc["n_layers"] == 1 and doc["n_heads"] == 4 and doc["n_kv_heads"] == 2
    for method in ("steer", "lora"):
        ok("finetune", "--model", model, "--demos", demos, "--method", method, "--heads", tmp_path / "heads.json",
           "--out", tmp_path / method, "--steps", 2, "--batch-size", 8)
    out = ok("report", "--heads", tmp_path / "heads.json", "--model", model, "--demos", demos, "--out",
             tmp_path / "report", "--frames", 1)
    assert (tmp_path / "report" / "heatmap.png").is_file()
    assert list((tmp_path / "report").glob("attention_L0.H*.png")), out
    ok("apply", "--model", model, "--steering", tmp_path / "steer" / "steering.safetensors", "--out", tmp_path / "applied")
    assert load_model(tmp_path / "applied").fingerprint() == load_model(tmp_path / "steer" / "model").fingerprint()

    bad = run.invoke(app, ["pretrain", "--data", str(demos), "--out", str(tmp_path / "x"), "--backbone",
                           str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "supported backbones" in bad.output and "minilm" in bad.output
    bad = run.invoke(app, ["pretrain", "--data", str(demos), "--out", str(tmp_path / "x"), "--backbone",
                           "tiny-llama", "--d-model", "64"])
    assert bad.exit_code == 2 and "EdgeVLA only" in bad.output


# --- a different action head: the flow-matching adapter ----------------------------------------------
def test_flow_matching_adapter_runs_the_pipeline(tmp_path, demos):
    from edge_steer.models.flow_matching import FlowMatchingVLA
    torch.manual_seed(0)
    m = FlowMatchingVLA.create(backbone_tower("tiny-llama"), vision_tower("tiny-siglip"), chunk=4, max_lang_tokens=8,
                               augment_shift=0)
    m = plant(m, demos, steps=80)
    assert isinstance(m, VLAPolicy)
    ps = probe_set(m, task_demos(demos), max_frames=32, other_instructions=[RIGHT])
    # the error is the adapter's own (MSE of the velocity) on a draw fixed per frame: a rerun agrees
    with torch.no_grad():
        first = m.action_error(m(**ps.inputs), ps.target, ps.valid)
        again = probe_set(m, task_demos(demos), max_frames=32)
        assert torch.equal(first, m.action_error(m(**again.inputs), again.target, again.valid))
    doc = identify(m, ps, IdentifyConfig(top_k=2, batch_size=32), baseline=probe_set(m, Dataset(demos), max_frames=32))
    for name, grid in [("ablation", doc["scores"]["ablation"]), ("attribution", doc["scores"]["attribution"]["ablation"])]:
        g = np.asarray(grid)
        assert np.unravel_index(np.argmax(g), g.shape) == (PLANTED.layer, PLANTED.head), name
    res = finetune(m, task_demos(demos), _quick("steer", steps=2), tmp_path / "s", heads=[PLANTED], heads_doc=doc)
    paths = save_result(res, tmp_path / "s")
    back = load_model(paths["model"])
    assert type(back) is FlowMatchingVLA and back.fingerprint() == res.model.fingerprint()
    obs = {"observation.images.front": np.zeros((32, 32, 3), np.uint8),
           "observation.images.wrist": np.zeros((32, 32, 3), np.uint8), "observation.state": np.zeros(8, np.float32)}
    assert back.predict(obs, "push the block to the left").shape == (4, 7)
