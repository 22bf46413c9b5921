"""The reference VLA: persistence, head addressing, chunk shapes/normalisation, training resume."""

import json

import numpy as np
import pytest
import torch

from edge_steer.models import CheckpointError, EdgeVLA, EdgeVLAConfig, HeadRef
from edge_steer.models.train import TrainConfig, fit

TINY = dict(image_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8, chunk=4,
            max_lang_tokens=12, stem_channels=(8, 16))


def tiny(**kw) -> EdgeVLA:
    torch.manual_seed(0)
    return EdgeVLA(EdgeVLAConfig(**{**TINY, **kw}))


def batch(model: EdgeVLA, b: int = 3, seed: int = 0, task="put the red cube on the blue plate"):
    rng = np.random.default_rng(seed)
    c = model.config
    out = {f"observation.images.{cam}": rng.integers(0, 256, (b, 40, 40, 3), dtype=np.uint8) for cam in c.cameras}
    out["observation.state"] = rng.normal(size=(b, c.state_dim)).astype(np.float32)
    out["action"] = rng.normal(size=(b, c.chunk, c.action_dim)).astype(np.float32)
    out["action_is_pad"] = np.zeros((b, c.chunk), bool)
    out["task"] = [task] * b
    return out


@pytest.mark.parametrize("language,keypoints", [("minilm", 0), ("embedding", 0), ("embedding", 4)])
def test_save_load_round_trip_is_bitwise(tmp_path, language, keypoints):
    m = tiny(language=language, keypoints=keypoints)
    m.set_stats({"action": {"mean": np.arange(7.0), "std": np.full(7, 2.0)},
                 "observation.state": {"mean": np.ones(8), "std": np.full(8, 3.0)}})
    m.save_pretrained(tmp_path / "ckpt")
    m2 = EdgeVLA.from_pretrained(tmp_path / "ckpt")
    a, b = m.state_dict(), m2.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert m.fingerprint() == m2.fingerprint()
    x = batch(m)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(**m.prepare(x)), m2(**m2.prepare(x)))


def test_corrupted_or_mismatched_checkpoints_are_refused(tmp_path):
    m = tiny()
    d = m.save_pretrained(tmp_path / "ok")
    with pytest.raises(CheckpointError, match="no model directory"):
        EdgeVLA.from_pretrained(tmp_path / "missing")
    # flipped bytes in the weights
    bad = tmp_path / "flip"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    w = bytearray((bad / "model.safetensors").read_bytes())
    w[-10] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(w))
    with pytest.raises(CheckpointError, match="checksum"):
        EdgeVLA.from_pretrained(bad)
    # weights from a different architecture under this config
    other = tiny(n_layers=3).save_pretrained(tmp_path / "other")
    meta = json.loads((other / "config.json").read_text())
    meta["config"]["n_layers"] = 2
    (other / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit"):
        EdgeVLA.from_pretrained(other)
    # unknown config fields and foreign model types
    meta = json.loads((d / "config.json").read_text())
    for key, value, msg in (("config", {**meta["config"], "wings": 2}, "unknown fields"),
                            ("model_type", "llama", "model_type")):
        (d / "config.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(CheckpointError, match=msg):
            EdgeVLA.from_pretrained(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        EdgeVLA.from_pretrained(d)


def test_zeroing_one_head_changes_exactly_that_heads_contribution():
    m = tiny().eval()
    x = m.prepare(batch(m))
    layer, head = 1, 2
    attn = m.blocks[layer].attn
    hd = m.config.head_dim
    seen = {}

    def record(_, args):
        seen["heads"] = args[0].detach().unflatten(-1, (-1, hd)).clone()

    def zero(_, args):
        x = args[0].clone()
        x[..., head * hd:(head + 1) * hd] = 0
        return (x,)

    def capture_out(_, __, out):
        seen.setdefault("attn_out", []).append(out.detach().clone())

    h_rec = attn.o_proj.register_forward_pre_hook(record)
    h_out = attn.register_forward_hook(capture_out)
    with torch.no_grad():
        m(**x)
    h_rec.remove()
    h_zero = attn.o_proj.register_forward_pre_hook(zero)
    with torch.no_grad():
        m(**x)
    h_zero.remove()
    h_out.remove()
    clean, ablated = seen["attn_out"]
    contribution = seen["heads"][..., head, :] @ attn.o_proj.weight[:, head * hd:(head + 1) * hd].T
    torch.testing.assert_close(clean - ablated, contribution, atol=1e-5, rtol=1e-5)
    # and the head list names this head's slices in the same places
    slices = next(h for h in m.heads() if h.ref == HeadRef(layer, head))
    assert slices.hook == f"blocks.{layer}.attn.o_proj"
    assert slices.o[0].param == f"blocks.{layer}.attn.o_proj.weight"
    assert (slices.o[0].dim, slices.o[0].start, slices.o[0].stop) == (1, head * hd, (head + 1) * hd)


def test_grouped_query_heads_share_key_value_slices():
    m = tiny(n_heads=4, n_kv_heads=2)
    heads = [h for h in m.heads() if h.ref.layer == 0]
    assert [h.kv_head for h in heads] == [0, 0, 1, 1]
    assert heads[0].k == heads[1].k and heads[0].k != heads[2].k
    assert heads[0].q != heads[1].q
    assert m.blocks[0].attn.k_proj.weight.shape[0] == 2 * m.config.head_dim
    out = m(**m.prepare(batch(m)))
    assert out.shape == (3, 4, 7)


def test_chunk_shapes_and_normalisation():
    m = tiny().eval()
    mean, std = np.linspace(-1, 1, 7), np.linspace(0.5, 2, 7)
    m.set_stats({"action": {"mean": mean, "std": std}, "observation.state": {"mean": np.zeros(8), "std": np.ones(8)}})
    x = batch(m, b=1)
    obs = {k: v[0] for k, v in x.items() if k.startswith("observation.")}
    chunk = m.predict(obs, x["task"][0])
    assert chunk.shape == (4, 7)
    with torch.no_grad():
        raw = m(**m.prepare(x))[0].numpy()
    np.testing.assert_allclose(chunk, raw * std + mean, rtol=1e-5, atol=1e-6)
    # the loss is computed in normalised space: the de-normalised prediction has zero loss
    target = dict(x, action=chunk[None].astype(np.float32))
    with torch.no_grad():
        assert m.loss(target, train=False).item() < 1e-5
    # padded steps do not count
    target["action"][0, -1] += 100.0
    target["action_is_pad"] = np.array([[False, False, False, True]])
    with torch.no_grad():
        assert m.loss(target, train=False).item() < 1e-5


@pytest.mark.parametrize("bad,err", [
    ({"observation.state": np.zeros((1, 5), np.float32)}, "observation.state"),
    ({"observation.images.front": np.zeros((1, 40, 40, 3), np.float32)}, "uint8"),
])
def test_bad_inputs_are_refused(bad, err):
    m = tiny()
    with pytest.raises(ValueError, match=err):
        m.prepare({**batch(m, b=1), **bad})


def test_unseen_words_get_pretrained_features_only_with_minilm():
    minilm, emb = tiny(language="minilm"), tiny(language="embedding")
    f1, m1 = minilm.encoder(["put the purple sphere behind the bowl"])
    f2, _ = minilm.encoder(["put the red sphere behind the bowl"])
    assert f1.shape[-1] == 384 and m1.sum() > 5
    assert not torch.allclose(f1, f2)  # the colour word changes the features
    ids, _ = emb.encoder(["put the purple sphere behind the bowl"])
    assert ids.dtype == torch.int64 and int(ids.max()) < emb.config.lang_buckets


def _stream(model, seed=0):
    def make(start):  # batch k depends only on k, as train.batches guarantees
        k = start
        while True:
            yield batch(model, b=4, seed=seed * 1000 + k)
            k += 1
    return make


def test_training_reduces_loss_and_resumes_exactly(tmp_path):
    cfg = TrainConfig(steps=12, batch_size=4, lr=3e-3, warmup=2, checkpoint_every=6, log_every=3, bf16=False)
    full = tiny()
    r_full = fit(full, list(full.parameters()), _stream(full), cfg, tmp_path / "full", progress=False)
    assert r_full.history[-1]["loss"] < r_full.history[0]["loss"]
    # interrupted during step 7 (checkpoint at 6), then resumed to 12: same weights as uninterrupted
    part = tiny()
    calls = []

    def dies_at_step_7(b):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return part.loss(b)

    with pytest.raises(KeyboardInterrupt):
        fit(part, list(part.parameters()), _stream(part), cfg, tmp_path / "part", loss_fn=dies_at_step_7,
            progress=False)
    resumed = tiny()
    r = fit(resumed, list(resumed.parameters()), _stream(resumed), cfg, tmp_path / "part", progress=False)
    assert r.steps == 12 and len(r.history) == len(r_full.history)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_nan_loss_stops_training(tmp_path):
    m = tiny()

    def nan_loss(_):
        return torch.tensor(float("nan"), requires_grad=True)

    with pytest.raises(FloatingPointError, match="loss became nan"):
        fit(m, list(m.parameters()), _stream(m), TrainConfig(steps=3, bf16=False), tmp_path, loss_fn=nan_loss,
            progress=False)


@pytest.mark.parametrize("has_bf16, asked, autocast", [(True, None, True), (False, None, False), (False, True, True),
                                                      (True, False, False)])
def test_bf16_autocast_only_where_the_cpu_has_bf16_units_unless_asked(has_bf16, asked, autocast, tmp_path, monkeypatch):
    """Emulated bf16 made a training step 9x slower on an AVX2-only CPU: the default follows the CPU."""
    import edge_steer.models.train as train
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: has_bf16)
    m, seen = tiny(), []

    def loss(b):
        seen.append(torch.is_autocast_enabled("cpu"))
        return m.loss(b)

    r = fit(m, list(m.parameters()), _stream(m), TrainConfig(steps=2, warmup=1, bf16=asked), tmp_path, loss_fn=loss,
            progress=False)
    assert seen == [autocast, autocast] and r.bf16 == autocast


def test_reference_vla_implements_the_model_interface():
    from edge_steer.models import VLAPolicy
    assert isinstance(tiny(), VLAPolicy)


def test_state_dropout_uses_a_learned_null_token_in_training_only():
    m = tiny(state_dropout=1.0)
    b = batch(m)
    x = m.prepare(b)
    with torch.no_grad():
        dropped = m(**x, state_drop=torch.ones(3, dtype=torch.bool))
        x2 = dict(x, state=x["state"] + 5.0)
        # with the state dropped, the state value cannot matter ...
        torch.testing.assert_close(dropped, m(**x2, state_drop=torch.ones(3, dtype=torch.bool)))
        # ... and without it (inference), it does
        assert not torch.allclose(m(**x), m(**x2))
    loss = m.loss(b)
    loss.backward()
    assert m.state_null.grad is not None and m.state_null.grad.abs().sum() > 0
    assert not hasattr(tiny(), "state_null")   # old checkpoints keep loading


def test_a_state_dropout_model_can_run_without_the_state():
    m = tiny(state_dropout=0.5)
    blind = EdgeVLA(EdgeVLAConfig(**{**TINY, "state_dropout": 0.5, "use_state": False}))
    blind.load_state_dict(m.state_dict())
    x = m.prepare(batch(m))
    with torch.no_grad():
        torch.testing.assert_close(blind(**x), m(**x, state_drop=torch.ones(3, dtype=torch.bool)))
        torch.testing.assert_close(blind(**x), blind(**dict(x, state=x["state"] - 2.0)))
    with pytest.raises(ValueError, match="state_dropout"):
        EdgeVLAConfig(use_state=False)


def test_keypoint_token_is_the_expected_location_of_each_map():
    """A map peaked at feature cell (r, c) must give that cell's (row, col) coordinate in [-1, 1],
    one token per camera placed after the camera's patches."""
    m = tiny(keypoints=3).eval()
    grid = m.config.image_size // 4
    peaks = [(0, 0), (2, 5), (grid - 1, 1)]

    def peaked(_mod, _inp, out):
        out = torch.full_like(out, -1e4)
        for k, (r, c) in enumerate(peaks):
            out[:, k, r, c] = 0.0
        return out

    seen = {}
    m.keypoint_maps.register_forward_hook(peaked)
    m.keypoint_in.register_forward_pre_hook(lambda _mod, inp: seen.setdefault("where", inp[0]))
    with torch.no_grad():
        m(**m.prepare(batch(m, b=2)))
    ramp = torch.linspace(-1, 1, grid)
    expected = torch.tensor([[ramp[r], ramp[c]] for r, c in peaks]).flatten()
    torch.testing.assert_close(seen["where"], expected.expand(2 * len(m.config.cameras), -1))
    layout = m.token_layout()
    cams = [layout[f"camera:{c}"] for c in m.config.cameras]
    assert all(s.stop - s.start == m.config.patches_per_camera + 1 for s in cams)
    assert layout["decision"] == m.decision_slice and m.decision_slice.stop == cams[-1].stop + m.config.chunk


def test_scene_loss_counts_only_valid_targets_and_only_in_training():
    m = tiny(scene_aux=1.0)
    b = batch(m)
    b["scene_xy"] = np.zeros((3, 4), np.float32)
    b["scene_xy_valid"] = np.array([[True, True, True, True], [False, False, True, True], [True] * 4])
    torch.manual_seed(0)
    base = m.loss(b)
    moved = dict(b, scene_xy=b["scene_xy"] + np.array([[0, 0, 0, 0], [5, 5, 0, 0], [0, 0, 0, 0]], np.float32))
    torch.manual_seed(0)
    torch.testing.assert_close(m.loss(moved), base)       # invalid entries do not count
    torch.manual_seed(0)
    assert m.loss(dict(b, scene_xy=b["scene_xy"] + 1.0)) > base
    no_scene = {k: v for k, v in b.items() if not k.startswith("scene")}
    torch.manual_seed(0)
    assert m.loss(no_scene) < base                          # the scene term is added ...
    torch.testing.assert_close(m.loss(b, train=False), m.loss(no_scene, train=False))   # ... in training only
    m.loss(b).backward()
    assert m.scene_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kernel", [4, 1])
def test_patch_conv_is_the_conv_it_replaces(kernel):
    """PatchConv2d (patch rows x weight matrix, for speed) computes what nn.Conv2d does, with the same
    parameters, so checkpoints and exports are unchanged; other strides are refused."""
    from edge_steer.models.vla import PatchConv2d
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, kernel, stride=kernel)
    ours = PatchConv2d(6, 5, kernel)
    ours.load_state_dict(conv.state_dict())
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    torch.testing.assert_close(ours(x), conv(x), rtol=1e-5, atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours(x).square().sum(), x)
    (g_conv,) = torch.autograd.grad(conv(x).square().sum(), x)
    torch.testing.assert_close(g_ours, g_conv, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="stride"):
        PatchConv2d(6, 5, 4, stride=2)


def test_training_attention_matches_the_fused_kernel():
    """In training the attention is written out (faster backward on CPU); loss and gradients must be
    those of PyTorch's fused kernel, padding mask included."""
    m = tiny(language="embedding").train()
    x = batch(m, b=2)
    x["task"] = ["put the red cube on the blue plate", "go"]   # different lengths: a padding mask
    torch.manual_seed(1)
    loss = m.loss(x, train=False)
    grads = torch.autograd.grad(loss, list(m.blocks.parameters()))
    for block in m.blocks:
        block.attn.fused_in_training = True
    loss_fused = m.loss(x, train=False)
    grads_fused = torch.autograd.grad(loss_fused, list(m.blocks.parameters()))
    torch.testing.assert_close(loss, loss_fused)
    for a, b in zip(grads, grads_fused):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_trunk_costs_prices_each_candidate_against_the_model(monkeypatch):
    """tools/bench_model.py --trunks: the issue-3 lever (a bigger trunk) priced before it is trained."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import bench_model

    assert bench_model.parse_trunks("d_model=64,n_heads=8;n_layers=3") == [{"d_model": 64, "n_heads": 8},
                                                                           {"n_layers": 3}]
    with pytest.raises(SystemExit, match="'width=3' is not one of"):
        bench_model.parse_trunks("width=3")
    monkeypatch.setattr(bench_model, "train_step_s", lambda m, batch: [1e-3 * m.config.n_layers * m.config.d_model])
    text = bench_model.trunk_costs(tiny(), bench_model.parse_trunks("d_model=64,n_heads=8;n_layers=3"), rounds=1)
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in text.splitlines()
            if r.startswith("| ") and "x shipped" not in r}
    assert list(rows) == ["shipped", "d_model=64, n_heads=8", "n_layers=3"]
    assert rows["shipped"][:2] == ["2 x 4 x 8, 32", "8"] and rows["shipped"][-1] == "1.00x"
    assert rows["d_model=64, n_heads=8"][:2] == ["2 x 8 x 8, 64", "16"] and rows["d_model=64, n_heads=8"][-1] == "2.00x"
    assert rows["n_layers=3"][-1] == "1.50x"
    wider = EdgeVLA(EdgeVLAConfig(**{**TINY, "d_model": 64, "n_heads": 8, "n_kv_heads": 8}))
    assert rows["d_model=64, n_heads=8"][2] == f"{sum(p.numel() for p in wider.parameters()):,}"


def test_a_grown_model_computes_what_it_grew_from_and_then_trains_its_new_parts():
    small = tiny(keypoints=4, scene_aux=1.0, state_dropout=0.3)
    small.action_std.fill_(3.0)
    big = small.grown(n_layers=3, n_heads=6)
    c = big.config
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.keypoints, c.scene_aux) == (3, 6, 6, 4, 1.0)
    assert len(big.heads()) == 18 and float(big.action_std[0]) == 3.0
    b = batch(small)
    small.eval(), big.eval()
    with torch.no_grad():
        torch.testing.assert_close(big(**big.prepare(b)), small(**small.prepare(b)), rtol=0, atol=1e-5)
    # the new parts are not dead: one step moves the new heads' o columns and the new layer's outputs
    big.train()
    big.loss(b).backward()
    assert big.blocks[0].attn.o_proj.weight.grad[:, 32:].abs().sum() > 0
    assert big.blocks[2].mlp[2].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="can only grow"):
        big.grown(n_layers=2)
    with pytest.raises(ValueError, match="grouped-query"):
        tiny(n_kv_heads=2).grown(n_heads=8)
