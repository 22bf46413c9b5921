"""Fine-tune a model on few-shot demos: steer, lora or full, through one training loop.

* steer: only the selected heads' slices train (query rows + output-projection columns by default;
  key/value rows are shared across query heads under grouped-query attention, so they stay frozen
  unless asked for). Each touched weight gets a small trainable tensor holding just its selected
  rows/columns, spliced into the frozen weight on every forward (`index_copy`), so the optimizer's
  state exists only for those values and every other weight is bitwise unchanged.
* lora: peft LoRA on the attention projections (q, k, v, o) of the heads the model exposes, by module
  path from the head locator (q_proj/k_proj/v_proj/o_proj, BERT's query/key/value/output.dense,
  Phi-3's qkv_proj, GPT-2's c_attn/c_proj), rank 16 / alpha 32 by default.
* full: every parameter.

The three differ only in which tensors `fit` receives and in what is saved.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from edge_steer.models.heads import HeadRef, HeadSlices, ParamSlice
from edge_steer.models.interface import check_dataset
from edge_steer.models.train import TrainConfig, TrainResult, batches, fit
from edge_steer.steering.delta import SteeringDelta

METHODS = ("steer", "lora", "full")


class FinetuneError(ValueError):
    pass


@dataclass(frozen=True)
class FinetuneConfig:
    method: str = "steer"
    slices: str = "qo"                      # steer: which of q, k, v, o slices of each selected head train
    # steer: modules trained whole beside the heads, by name (e.g. "stem.0", the first conv layer): for a
    # shift the attention cannot absorb, such as dim light, at a few thousand more values
    whole: tuple[str, ...] = ()
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = ()     # module paths; () = every q/k/v/o projection of model.heads()
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=300, batch_size=32, lr=1e-3, warmup=20, checkpoint_every=100, log_every=25))

    def __post_init__(self):
        if self.method not in METHODS:
            raise FinetuneError(f"method must be one of {METHODS}, got {self.method!r}")
        if not self.slices or set(self.slices) - set("qkvo"):
            raise FinetuneError(f"slices must be letters from 'qkvo', got {self.slices!r}")


# ------------------------------------------------------------------------------------------------
# steer: trainable slices spliced into frozen weights
# ------------------------------------------------------------------------------------------------
class _SliceOverride(nn.Module):
    """A parametrization: the frozen weight with rows/columns `idx` along `dim` taken from `values`."""

    def __init__(self, base: torch.Tensor, dim: int, idx: torch.Tensor):
        super().__init__()
        self.dim = dim
        self.register_buffer("idx", idx)
        self.values = nn.Parameter(base.detach().index_select(dim, idx).clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.index_copy(self.dim, self.idx, self.values.to(w.dtype))


def head_slices(model, heads: list[HeadRef], which: str = "qo") -> list[ParamSlice]:
    """The parameter slices of `heads` (an error names any head the model does not have)."""
    table: dict[HeadRef, HeadSlices] = {h.ref: h for h in model.heads()}
    unknown = [str(h) for h in heads if h not in table]
    if unknown:
        raise FinetuneError(f"the model has no heads {unknown} ({len(table)} heads)")
    return [s for h in heads for s in table[h].slices(which)]


def whole_slices(model: nn.Module, modules: tuple[str, ...]) -> list[ParamSlice]:
    """Every row of every parameter of the named modules, as slices (so the delta format holds them)."""
    out = []
    params = dict(model.named_parameters())
    for name in modules:
        found = [n for n in params if n.startswith(name + ".")]
        if not found:
            tops = sorted({n.split(".")[0] for n in params})
            raise FinetuneError(f"the model has no module {name!r} with parameters (top-level modules: {tops})")
        out += [ParamSlice(n, 0, 0, params[n].shape[0]) for n in found]
    return out


class SteerParams:
    """Installs slice overrides on a model; `delta()` reads them back as a SteeringDelta."""

    def __init__(self, model: nn.Module, slices: list[ParamSlice]):
        self.model = model
        groups: dict[tuple[str, int], set[int]] = {}
        for s in slices:
            groups.setdefault((s.param, s.dim), set()).update(range(s.start, s.stop))
        modules = dict(model.named_modules())
        self.overrides: dict[tuple[str, int], _SliceOverride] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        for (name, dim), rows in sorted(groups.items()):
            mod_path, attr = name.rsplit(".", 1)
            module = modules[mod_path]
            if (name, 1 - dim) in groups:
                raise FinetuneError(f"{name}: rows and columns of one weight cannot both be steered")
            ov = _SliceOverride(getattr(module, attr), dim, torch.tensor(sorted(rows), dtype=torch.int64))
            parametrize.register_parametrization(module, attr, ov, unsafe=True)
            getattr(module.parametrizations, attr).original.requires_grad_(False)
            self.overrides[(name, dim)] = ov

    def parameters(self) -> list[nn.Parameter]:
        return [ov.values for ov in self.overrides.values()]

    def delta(self, base_fingerprint: str, heads_doc: dict[str, Any] | None, which: str) -> SteeringDelta:
        tensors = {key: (ov.idx.clone(), ov.values.detach().clone()) for key, ov in self.overrides.items()}
        return SteeringDelta(base_fingerprint, tensors, dict(heads_doc or {}), which)

    def remove(self) -> None:
        """Take the overrides out again, leaving the spliced weights in place."""
        for name, _dim in self.overrides:
            mod_path, attr = name.rsplit(".", 1)
            parametrize.remove_parametrizations(dict(self.model.named_modules())[mod_path], attr,
                                                leave_parametrized=True)


# ------------------------------------------------------------------------------------------------
# lora
# ------------------------------------------------------------------------------------------------
def lora_targets(model) -> list[str]:
    """Module paths of the attention projections of the model's heads (fused ones once)."""
    return sorted({s.param.rsplit(".", 1)[0] for h in model.heads() for s in h.slices("qkvo")})


def lora_config(cfg: FinetuneConfig, model=None):
    from peft import LoraConfig
    targets = list(cfg.lora_targets) or lora_targets(model)
    # exact paths: peft would also match a target by suffix, so anchor each one at the root
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=targets if cfg.lora_targets else "^(" + "|".join(
                          t.replace(".", r"\.") for t in targets) + ")$", bias="none")


def add_lora(model: nn.Module, cfg: FinetuneConfig) -> list[nn.Parameter]:
    """Inject peft LoRA adapters in place; returns the trainable adapter parameters."""
    from peft import inject_adapter_in_model
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(lora_config(cfg, model), model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and restore plain Linear layers."""
    from peft.tuners.lora import LoraLayer
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_path, attr = path.rsplit(".", 1) if "." in path else ("", path)
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, attr, module.get_base_layer())
    return model


# ------------------------------------------------------------------------------------------------
# The one loop
# ------------------------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    method: str
    model: nn.Module                 # the fine-tuned model, plain (overrides / adapters merged)
    trainable_params: int
    train: TrainResult
    delta: SteeringDelta | None = None
    adapter: dict[str, torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def finetune(base: nn.Module, dataset, cfg: FinetuneConfig, out_dir: str | Path,
             heads: list[HeadRef] | None = None, heads_doc: dict[str, Any] | None = None,
             resume: bool = False, progress: bool = True) -> FinetuneResult:
    """Fine-tune a copy of `base` on `dataset`; `base` itself is left untouched (and `out_dir` too
    where the demos do not fit the model: DatasetError before any work)."""
    check_dataset(base, dataset)
    if len(dataset) < cfg.train.batch_size // 4 or len(dataset) < 8:
        raise FinetuneError(f"the demos hold {len(dataset)} frames: too few to fine-tune on")
    base_fp = base.fingerprint()
    model = copy.deepcopy(base)
    model.eval()  # no dropout in our models; train/eval only switches augmentation via loss(train=...)
    steer = None
    if cfg.method == "steer":
        if not heads and not cfg.whole:   # heads may be none only where a whole module trains (a control arm)
            raise FinetuneError("steer fine-tuning needs selected heads (run identify first)")
        steer = SteerParams(model, head_slices(model, heads, cfg.slices) + whole_slices(model, cfg.whole))
        params = steer.parameters()
    elif cfg.method == "lora":
        params = add_lora(model, cfg)
    else:
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
    n_trainable = sum(p.numel() for p in params)
    chunk = base.config.chunk
    result = fit(model, params, lambda start: batches(dataset, cfg.train.batch_size, chunk, cfg.train.seed, start),
                 cfg.train, out_dir, resume=resume, progress=progress)
    delta = adapter = None
    if steer is not None:
        delta = steer.delta(base_fp, heads_doc, cfg.slices)
        model = delta.apply_(copy.deepcopy(base), base_fp)   # the shipped model is base + delta, by construction
    elif cfg.method == "lora":
        adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        model = merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return FinetuneResult(cfg.method, model.eval(), n_trainable, result, delta, adapter,
                          {"config": _jsonable(asdict(cfg)), "base_fingerprint": base_fp})


def save_result(res: FinetuneResult, out_dir: str | Path) -> dict[str, str]:
    """model/ (the merged checkpoint, for eval and export) plus what the method ships:
    steer -> steering.safetensors (the delta), lora -> adapter.safetensors, full -> nothing more."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    paths = {"model": str(res.model.save_pretrained(out / "model"))}
    if res.delta is not None:
        paths["steering"] = str(res.delta.save(out / "steering.safetensors"))
        (out / "heads.json").write_text(json.dumps(res.delta.heads, indent=1))
    if res.adapter is not None:
        save_file({k: v.contiguous() for k, v in res.adapter.items()}, str(out / "adapter.safetensors"))
        paths["adapter"] = str(out / "adapter.safetensors")
    summary = {"method": res.method, "trainable_params": res.trainable_params, "steps": res.train.steps,
               "final_loss": res.train.final_loss, "seconds": res.train.seconds,
               "samples_per_s": res.train.samples_per_s, "history": res.train.history, **res.info, "files": paths}
    (out / "finetune.json").write_text(json.dumps(summary, indent=1))
    return paths


def _jsonable(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    return d


def with_train(cfg: FinetuneConfig, **train_overrides) -> FinetuneConfig:
    return replace(cfg, train=replace(cfg.train, **train_overrides))
