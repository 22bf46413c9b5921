"""Identify: which attention heads mediate a new task, and through which factor.

Every score is measured on the new task's few-shot demos (the *probe set*: frames, their
instructions and the demonstrated action chunks) at the decision tokens (the action queries), with
the action error = L1 between predicted and demonstrated normalised chunks:

* ablation    (exact) replace a head's output by its mean over a baseline set; effect = error increase.
* patching    (exact) replace a head's output by its value in a *corrupted* run where one factor
              changed — visual (images of another scene), language (another instruction), physical
              (another robot state) — so each head's effect is known per factor.
* attribution (fast)  first-order estimate of both: (replacement - clean activation) . d error / d
              activation, from one forward + one backward for all heads at once.
* probe       how well a head's activation alone predicts the demonstrated chunk: ridge (or KNN)
              regression, cross-validated by leaving one episode out; R^2.

Exact scores cache the trunk's input at every layer once, then ablate all heads of a layer in one
batched forward that runs only that layer and the ones after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from edge_steer.data import DatasetError
from edge_steer.models.heads import HeadRef
from edge_steer.models.interface import check_dataset, layer_count
from edge_steer.steering.hooks import edit_head_inputs, record_head_inputs

FACTORS = ("visual", "language", "physical")
METHODS = ("attribution", "ablation", "patching", "probe")
HEADS_FORMAT = "edge-steer-heads/1"


class IdentifyError(ValueError):
    pass


@dataclass(frozen=True)
class IdentifyConfig:
    method: str = "attribution"       # what ranks the heads: one of METHODS
    top_k: int = 8
    coverage: float | None = None     # instead of top_k: fewest heads holding this share of the total effect
    max_frames: int = 256             # probe-set size (frames spread evenly over the demos)
    batch_size: int = 32
    probe: str = "ridge"              # ridge | knn
    exact: bool = True                # also run exact ablation + patching (needed to report agreement)
    attribution: str = "shift"        # what attribution differentiates: "shift" (action) | "error" (see _Runner.gradients)
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise IdentifyError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.attribution not in ("shift", "error"):
            raise IdentifyError(f"attribution must be shift or error, got {self.attribution!r}")
        if self.probe not in ("ridge", "knn"):
            raise IdentifyError(f"probe must be ridge or knn, got {self.probe!r}")
        if self.coverage is not None and not 0 < self.coverage <= 1:
            raise IdentifyError("coverage must lie in (0, 1]")
        if self.top_k < 1:
            raise IdentifyError("top_k must be at least 1")


# ------------------------------------------------------------------------------------------------
# The probe set
# ------------------------------------------------------------------------------------------------
@dataclass
class ProbeSet:
    inputs: dict[str, torch.Tensor]               # model.prepare() output, N frames
    target: torch.Tensor                          # (N, chunk, A) normalised demonstrated actions
    valid: torch.Tensor                           # (N, chunk) bool
    episodes: np.ndarray                          # (N,) episode index of each frame
    corrupt: dict[str, dict[str, torch.Tensor]]   # factor -> inputs with that factor swapped
    tasks: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.episodes)


MIN_FRAMES = 8


def probe_set(model, dataset, max_frames: int = 256, seed: int = 0,
              other_instructions: Sequence[str] = ()) -> ProbeSet:
    """Frames of the demos, spread evenly, with one corrupted copy per factor.

    visual / physical: each frame takes the images / robot state of a frame from another episode
    (another scene and layout); language: each frame gets one of `other_instructions` (other tasks'
    instructions). Without other instructions the language factor is left out."""
    c = model.config
    _check_demos(model, dataset)
    n = len(dataset)
    if n < MIN_FRAMES:
        raise IdentifyError(f"the demos hold {n} frames; identification needs at least {MIN_FRAMES}")
    idx = np.unique(np.linspace(0, n - 1, min(n, max_frames)).round().astype(np.int64))
    batch = dataset.sample(idx, chunk=c.chunk)
    with torch.no_grad():
        inputs = model.prepare(batch)
        target, valid = model.action_target(batch)
    episodes = np.asarray(batch["episode_index"])
    rng = np.random.default_rng(seed)
    partner = torch.as_tensor(_partners(episodes, np.asarray(batch["frame_index"]), rng))
    corrupt = {"visual": {**inputs, "images": inputs["images"][partner]},
               "physical": {**inputs, "state": inputs["state"][partner]}}
    own = set(batch["task"])
    others = [t for t in other_instructions if t not in own]
    if others:
        corrupt["language"] = {**inputs, **model.encode_instructions([others[i % len(others)] for i in range(len(idx))])}
    return ProbeSet(inputs, target, valid, episodes, {f: corrupt[f] for f in FACTORS if f in corrupt},
                    sorted(own))


def _check_demos(model, dataset) -> None:
    try:
        check_dataset(model, dataset)
    except DatasetError as e:
        raise IdentifyError(str(e)) from e


def _partners(episodes: np.ndarray, frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each frame, a frame of another episode (or, with one episode, one far away in time)."""
    n = len(episodes)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        pool = np.flatnonzero(episodes != episodes[i])
        if len(pool) == 0:
            far = np.abs(frames - frames[i])
            pool = np.flatnonzero(far >= max(1, far.max() // 3))
        out[i] = rng.choice(pool) if len(pool) else i
    return out


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------
@dataclass
class Scores:
    """(n_layers, n_heads) arrays; per-factor dicts hold one per factor."""
    ablation: np.ndarray | None = None
    patching: dict[str, np.ndarray] = field(default_factory=dict)
    attribution: dict[str, np.ndarray] = field(default_factory=dict)   # "ablation" + factors
    probe: np.ndarray | None = None
    clean_error: float = float("nan")


class _Runner:
    """The model split into cached stages, over a probe set, in batches."""

    def __init__(self, model, ps: ProbeSet, batch_size: int):
        self.model, self.ps, self.bs = model, ps, batch_size
        heads = model.heads()
        self.n_layers, self.n_heads, self.hd = layer_count(heads)
        self.hooks = [next(h.hook for h in heads if h.ref.layer == layer) for layer in range(self.n_layers)]
        self.dec = model.decision_slice
        self.passes = 0.0   # full forwards over the probe set (a backward counts as two)

    def batches(self) -> list[slice]:
        n = len(self.ps)
        return [slice(i, min(n, i + self.bs)) for i in range(0, n, self.bs)]

    def errors(self, pred: torch.Tensor, sl: slice) -> torch.Tensor:
        return self.model.action_error(pred, self.ps.target[sl], self.ps.valid[sl])

    @torch.no_grad()
    def run(self, inputs: dict[str, torch.Tensor], keep_resid: bool = False):
        """Full forward: per-sample errors (N,), head inputs at decision tokens per layer
        (N, Tdec, H*hd), and (optionally) each layer's trunk input (N, T, D)."""
        m = self.model
        errs, acts, resid = [], [[] for _ in range(self.n_layers)], [[] for _ in range(self.n_layers)]
        for sl in self.batches():
            x, mask = m.embed(**{k: v[sl] for k, v in inputs.items()})
            with record_head_inputs(m, self.hooks) as seen:
                for layer in range(self.n_layers):
                    if keep_resid:
                        resid[layer].append(x)
                    x = m.trunk(x, mask, layer, layer + 1)
            errs.append(self.errors(m.readout(x), sl))
            for layer, path in enumerate(self.hooks):
                acts[layer].append(seen[path][:, self.dec])
        self.passes += 1
        out_resid = [torch.cat(r) for r in resid] if keep_resid else None
        return torch.cat(errs), [torch.cat(a) for a in acts], out_resid

    @torch.no_grad()
    def exact(self, resid: list[torch.Tensor], masks: torch.Tensor, replacement: list[torch.Tensor],
              clean_err: float) -> np.ndarray:
        """Error increase when each head's decision-token output is replaced, one head at a time;
        all heads of a layer in one batched forward from that layer on."""
        m, H, hd, dec = self.model, self.n_heads, self.hd, self.dec
        total = np.zeros((self.n_layers, H))
        for layer in range(self.n_layers):
            for sl in self.batches():
                x = resid[layer][sl]
                b = x.shape[0]
                r = replacement[layer]
                r = (r[sl] if r.shape[0] > 1 else r.expand(b, -1, -1)).unflatten(-1, (H, hd))

                def edit(inp, r=r, b=b):
                    v = inp.clone().unflatten(0, (H, b)).unflatten(-1, (H, hd))   # (copy, B, T, H, hd)
                    for h in range(H):
                        v[h, :, dec, h] = r[:, :, h]
                    return v.flatten(-2).flatten(0, 1)

                with edit_head_inputs(m, {self.hooks[layer]: edit}):
                    pred = m.readout(m.trunk(x.repeat(H, 1, 1), masks[sl].repeat(H, 1), start=layer))
                per = self.errors(pred.unflatten(0, (H, b)), sl)                      # (H, B)
                total[layer] += per.sum(-1).numpy()
            self.passes += H * (self.n_layers - layer) / self.n_layers
        return total / len(self.ps) - clean_err

    def gradients(self, metric: str = "shift", seed: int = 0) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
        """One forward + backward: clean head inputs and their gradients at the decision tokens, per layer.

        metric "error": the gradient of the mean action error. Near a good fit it is mostly the sign
        of each residual, so its first-order estimate of an ablation barely tracks the exact one.
        metric "shift": the gradient of <prediction, u> with a random Gaussian u per sample; each
        sample's projection (delta a . gradient) then has expectation-of-square |J delta a|^2, the
        squared action shift the replacement causes, which is what the error grows by near a fit."""
        m = self.model
        acts, grads = [[] for _ in range(self.n_layers)], [[] for _ in range(self.n_layers)]
        total = 0.0
        gen = torch.Generator().manual_seed(seed)
        for sl in self.batches():
            with torch.no_grad():
                x, mask = m.embed(**{k: v[sl] for k, v in self.ps.inputs.items()})
            with record_head_inputs(m, self.hooks, keep_grad=True) as seen:
                pred = m.readout(m.trunk(x, mask))
                err = self.errors(pred, sl)
                if metric == "shift":
                    (pred.float() * torch.randn(pred.shape, generator=gen)).sum().backward()
                else:
                    (err.sum() / len(self.ps)).backward()
            total += float(err.detach().sum())
            for layer, path in enumerate(self.hooks):
                acts[layer].append(seen[path].detach()[:, self.dec])
                grads[layer].append(seen[path].grad[:, self.dec])
        m.zero_grad(set_to_none=True)
        self.passes += 3
        return total / len(self.ps), [torch.cat(a) for a in acts], [torch.cat(g) for g in grads]

    def attribute(self, acts: list[torch.Tensor], grads: list[torch.Tensor],
                  replacement: list[torch.Tensor], metric: str = "shift") -> np.ndarray:
        out = np.zeros((self.n_layers, self.n_heads))
        for layer in range(self.n_layers):
            diff = (replacement[layer] - acts[layer]) * grads[layer]          # (N, Tdec, H*hd)
            per = diff.unflatten(-1, (self.n_heads, self.hd)).sum((1, 3))     # (N, H)
            if metric == "shift":   # RMS action shift (normalised units) over the probe set
                out[layer] = per.pow(2).mean(0).sqrt().numpy()
            else:                   # first-order change of the mean error
                out[layer] = per.sum(0).numpy()
        return out


def score_heads(model, ps: ProbeSet, cfg: IdentifyConfig = IdentifyConfig(),
                baseline: ProbeSet | None = None, progress: Callable[[str], None] | None = None) -> tuple[Scores, dict]:
    """Every score the config asks for; returns (scores, timing)."""
    say = progress or (lambda _msg: None)
    model.eval()
    run = _Runner(model, ps, cfg.batch_size)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        masks = torch.cat([model.embed(**{k: v[sl] for k, v in ps.inputs.items()})[1] for sl in run.batches()])
    say("clean run")
    clean_errs, clean_acts, resid = run.run(ps.inputs, keep_resid=cfg.exact or cfg.method in ("ablation", "patching"))
    clean_err = float(clean_errs.mean())
    scores = Scores(clean_error=clean_err)
    if baseline is not None:
        say("baseline run")
        base_acts = run.run(baseline.inputs)[1]
    else:
        base_acts = clean_acts
    mean_repl = [a.mean(0, keepdim=True) for a in base_acts]
    say("corrupted runs")
    corrupt_acts = {f: run.run(inp)[1] for f, inp in ps.corrupt.items()}
    timing["setup_s"] = time.perf_counter() - t0
    # passes both estimates need: the replacement activations (baseline and corrupted runs); the clean
    # forward they also need is part of the attribution's forward + backward, and of the exact scores
    shared = run.passes - 1

    t1 = time.perf_counter()
    say("attribution (one backward)")
    _, acts, grads = run.gradients(cfg.attribution, cfg.seed)
    scores.attribution["ablation"] = run.attribute(acts, grads, mean_repl, cfg.attribution)
    for f, ca in corrupt_acts.items():
        scores.attribution[f] = run.attribute(acts, grads, ca, cfg.attribution)
    timing["attribution_s"] = time.perf_counter() - t1 + timing["setup_s"]
    timing["attribution_passes"] = 3 + shared          # forward + backward (counted as two) + replacements

    if cfg.exact or cfg.method in ("ablation", "patching"):
        t2, p0 = time.perf_counter(), run.passes
        say("exact mean ablation")
        scores.ablation = run.exact(resid, masks, mean_repl, clean_err)
        for f, ca in corrupt_acts.items():
            say(f"exact patching: {f}")
            scores.patching[f] = run.exact(resid, masks, ca, clean_err)
        timing["exact_s"] = time.perf_counter() - t2 + timing["setup_s"]
        timing["exact_passes"] = run.passes - p0 + 1 + shared
        # the seed's way: one full forward per head and replacement, plus the clean run
        timing["exhaustive_passes"] = run.n_layers * run.n_heads * (1 + len(corrupt_acts)) + 1 + shared
    if cfg.method == "probe" or cfg.exact:
        t3 = time.perf_counter()
        say(f"{cfg.probe} probe")
        scores.probe = probe_scores(clean_acts, ps.target, ps.episodes, run.n_heads, cfg.probe)
        timing["probe_s"] = time.perf_counter() - t3
    timing["total_s"] = time.perf_counter() - t0
    return scores, timing


def probe_scores(acts: list[torch.Tensor], target: torch.Tensor, episodes: np.ndarray, n_heads: int,
                 kind: str = "ridge", ridge: float = 1.0, k: int = 5) -> np.ndarray:
    """Leave-one-episode-out R^2 of predicting the demonstrated chunk from one head's activation."""
    y = target.flatten(1).numpy().astype(np.float64)
    eps = np.unique(episodes)
    folds = [episodes == e for e in eps] if len(eps) > 1 else list(_kfold(len(y), 5))
    out = np.zeros((len(acts), n_heads))
    for layer, a in enumerate(acts):
        per_head = a.unflatten(-1, (n_heads, -1)).transpose(1, 2).flatten(2).numpy().astype(np.float64)  # (N,H,Tdec*hd)
        for h in range(n_heads):
            x = per_head[:, h]
            pred = np.zeros_like(y)
            for test in folds:
                tr = ~test
                mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
                xtr, xte = (x[tr] - mu) / sd, (x[test] - mu) / sd
                ymu = y[tr].mean(0)
                if kind == "ridge":
                    w = np.linalg.solve(xtr.T @ xtr + ridge * len(xtr) * np.eye(x.shape[1]), xtr.T @ (y[tr] - ymu))
                    pred[test] = xte @ w + ymu
                else:
                    d = ((xte[:, None] - xtr[None]) ** 2).sum(-1)
                    nn_idx = np.argsort(d, 1)[:, :k]
                    pred[test] = y[tr][nn_idx].mean(1)
            sst = ((y - y.mean(0)) ** 2).sum()
            out[layer, h] = 1.0 - ((y - pred) ** 2).sum() / max(sst, 1e-12)
    return out


def _kfold(n: int, k: int):
    for i in range(k):
        m = np.zeros(n, dtype=bool)
        m[i::k] = True
        yield m


# ------------------------------------------------------------------------------------------------
# Ranking, selection, labels
# ------------------------------------------------------------------------------------------------
def ranking_scores(scores: Scores, method: str) -> np.ndarray:
    if method == "ablation":
        return scores.ablation
    if method == "patching":
        return sum(np.clip(v, 0, None) for v in scores.patching.values())
    if method == "attribution":
        return scores.attribution["ablation"]
    return scores.probe


def factor_effects(scores: Scores) -> dict[str, np.ndarray]:
    """Per-factor effects: exact patching when it was run, else its attribution estimate."""
    src = scores.patching or {f: v for f, v in scores.attribution.items() if f in FACTORS}
    return dict(src)


def _tolerance(rank: np.ndarray) -> float:
    """Effects below this are float noise (batched and unbatched forwards round differently)."""
    return 1e-4 * float(np.abs(rank).max(initial=0.0)) + 1e-7


def select_heads(rank: np.ndarray, top_k: int = 8, coverage: float | None = None) -> list[HeadRef]:
    """Up to top_k heads with a positive effect, best first, or the fewest heads covering
    `coverage` of the total positive effect. A head with no effect is never selected."""
    tol = _tolerance(rank)
    flat = np.where(rank > tol, rank, 0.0).ravel()
    order = [i for i in np.argsort(-flat, kind="stable") if flat[i] > 0]
    if not order:
        raise IdentifyError("no head has a positive effect on this task's action error: nothing to select "
                            "(too few or uninformative demos?)")
    n_heads = rank.shape[1]
    if coverage is not None:
        cum = np.cumsum(flat[order]) / flat.sum()
        count = int(np.searchsorted(cum, coverage - 1e-12) + 1)
    else:
        count = top_k
    return [HeadRef(int(i) // n_heads, int(i) % n_heads) for i in order[:count]]


def label(effects: dict[str, np.ndarray], ref: HeadRef, share: float = 0.5) -> list[str]:
    """The factors whose effect through this head is at least `share` of its largest one."""
    vals = {f: float(v[ref.layer, ref.head]) for f, v in effects.items()}
    top = max(vals.values(), default=0.0)
    if top <= max((_tolerance(v) for v in effects.values()), default=0.0):
        return []
    return [f for f, v in vals.items() if v >= share * top]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(a.ravel()), _ranks(b.ravel())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / den) if den > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):          # ties share their mean rank
        m = x == v
        if m.sum() > 1:
            r[m] = r[m].mean()
    return r


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    ta, tb = set(np.argsort(-a.ravel())[:k]), set(np.argsort(-b.ravel())[:k])
    return len(ta & tb) / k


def agreement(scores: Scores, k: int) -> dict[str, Any]:
    """How well attribution patching ranks heads like the exact scores it approximates."""
    if scores.ablation is None:
        return {}
    out = {"ablation": {"spearman": spearman(scores.attribution["ablation"], scores.ablation),
                        "topk_overlap": topk_overlap(scores.attribution["ablation"], scores.ablation, k), "k": k}}
    for f, exact in scores.patching.items():
        out[f] = {"spearman": spearman(scores.attribution[f], exact),
                  "topk_overlap": topk_overlap(scores.attribution[f], exact, k), "k": k}
    return out


# ------------------------------------------------------------------------------------------------
# The whole step, and heads.json
# ------------------------------------------------------------------------------------------------
def identify(model, ps: ProbeSet, cfg: IdentifyConfig = IdentifyConfig(), baseline: ProbeSet | None = None,
             demos: dict[str, Any] | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score, rank, select and label heads; returns the heads.json document."""
    scores, timing = score_heads(model, ps, cfg, baseline, progress)
    rank = ranking_scores(scores, cfg.method)
    if rank is None or not np.all(np.isfinite(rank)):
        raise IdentifyError("head scores are not finite (the model produced NaN on the demos?)")
    chosen = select_heads(rank, cfg.top_k, cfg.coverage)
    effects = factor_effects(scores)
    k = len(chosen)

    def grid(a):
        return None if a is None else np.round(a, 8).tolist()

    heads = model.heads()
    n_layers, n_heads, _ = layer_count(heads)
    return {
        "format": HEADS_FORMAT,
        "model_fingerprint": model.fingerprint(),
        "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": len({h.kv_head for h in heads if h.ref.layer == 0}),
        "method": cfg.method, "config": asdict(cfg),
        "demos": {**(demos or {}), "frames": len(ps), "episodes": sorted(int(e) for e in np.unique(ps.episodes)),
                  "tasks": ps.tasks},
        "factors": list(ps.corrupt),
        "clean_error": scores.clean_error,
        "scores": {"ablation": grid(scores.ablation),
                   "patching": {f: grid(v) for f, v in scores.patching.items()},
                   "attribution": {f: grid(v) for f, v in scores.attribution.items()},
                   "probe": grid(scores.probe)},
        "ranking": grid(rank),
        "selected": [{"head": str(h), "layer": h.layer, "index": h.head, "score": float(rank[h.layer, h.head]),
                      "factors": label(effects, h)} for h in chosen],
        "agreement": agreement(scores, k),
        "timing": timing,
    }


def demo_probe_sets(model, dataset, cfg: IdentifyConfig = IdentifyConfig(),
                    baseline=None) -> tuple[ProbeSet, ProbeSet | None]:
    """What `identify` reads from a dataset of demos: its probe set (the instruction corrupted with every
    other registered task's) and, given a `baseline` dataset, that one's for mean ablation. Raises
    DatasetError for a damaged frame."""
    from edge_steer.sim.tasks import TASKS

    others = sorted({t.instruction for t in TASKS.values()})
    ps = probe_set(model, dataset, cfg.max_frames, cfg.seed, others)
    return ps, probe_set(model, baseline, cfg.max_frames, cfg.seed) if baseline is not None else None


def selected_heads(doc: dict[str, Any], model=None) -> list[HeadRef]:
    """The selected heads of a heads.json document; with a model, check it is the same model."""
    if doc.get("format") != HEADS_FORMAT:
        raise IdentifyError(f"not an edge-steer heads file (format {doc.get('format')!r})")
    if model is not None and doc.get("model_fingerprint") != model.fingerprint():
        raise IdentifyError("this heads file was identified on another model (fingerprint "
                            f"{str(doc.get('model_fingerprint'))[:12]}); run identify on this model")
    return [HeadRef(s["layer"], s["index"]) for s in doc["selected"]]
