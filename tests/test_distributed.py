"""`finetune` under torchrun: two CPU processes (gloo), each on half of every global batch, end with the same
weights as one process on the whole batch, for steer and LoRA (DDP over the trainable tensors) and full
fine-tuning (FSDP2, also stopped at a checkpoint and resumed); and a process that trained on its half alone (the
reduction removed) would not: the comparison fails when DDP is taken out (checked by hand when written)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from steering_fixtures import PLANTED, tiny_model, write_demos

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
METHODS = ("steer", "lora", "full")

CHILD = """
import sys, torch
sys.path[:0] = [{tests!r}, {root!r}]
from steering_fixtures import PLANTED, tiny_model
from edge_steer.data import Dataset
from edge_steer.models.distributed import is_main
from edge_steer.steering.finetune import FinetuneConfig, finetune, with_train
demos, out = sys.argv[1:3]
def run(method, name, steps, resume=False):
    cfg = with_train(FinetuneConfig(method=method), steps=steps, batch_size=8, lr=3e-3, bf16=False, checkpoint_every=2)
    res = finetune(tiny_model(), Dataset(demos), cfg, out + "/" + name, heads=[PLANTED], resume=resume, progress=False)
    if is_main():
        torch.save({{k: v.detach().clone() for k, v in res.model.state_dict().items()}}, out + "/" + name + ".pt")
for method in sys.argv[3:]:   # one process group, one launch, every method
    run(method, method, 4)
run("full", "resumed", 2)     # a sharded run stopped at its checkpoint and resumed: gathered, then loaded back
run("full", "resumed", 4, resume=True)
"""


def one_process(method: str, demos: Path, out: Path) -> dict[str, torch.Tensor]:
    from edge_steer.data import Dataset
    from edge_steer.steering.finetune import FinetuneConfig, finetune, with_train
    cfg = with_train(FinetuneConfig(method=method), steps=4, batch_size=8, lr=3e-3, bf16=False, checkpoint_every=10**9)
    res = finetune(tiny_model(), Dataset(demos), cfg, out, heads=[PLANTED], progress=False)
    return res.model.state_dict()


def assert_same(two: dict, one: dict, method: str) -> None:
    # a key bias adds the same logit to every key of a query's row, so softmax's gradient to it is zero but for
    # rounding; Adam scales that rounding noise up to full steps, whose signs depend on summation order
    noise = {k for k in one if k.endswith("k_proj.bias")} if method == "full" else set()
    for k in one.keys() - noise:   # float32, summed in another order: equal to 1e-5 of the weights' scale
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=f"{method}: {k} differs")


def test_two_processes_end_with_the_weights_of_one_on_the_same_global_batch(tmp_path, monkeypatch):
    demos = write_demos(tmp_path / "demos")     # two instructions: the two halves of a batch pull apart
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS), root=str(ROOT)))
    two_dir = tmp_path / "two"
    two_dir.mkdir()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                          str(script), str(demos), str(two_dir), *METHODS],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    base, ones = tiny_model().state_dict(), {}
    for method in METHODS:
        one = ones[method] = one_process(method, demos, tmp_path / "one" / method)
        moved = [k for k in one if not torch.equal(one[k], base[k])]
        assert moved, f"{method}: nothing trained: the comparison would prove nothing"
        assert_same(torch.load(two_dir / f"{method}.pt"), one, method)
    assert_same(torch.load(two_dir / "resumed.pt"), ones["full"], "full")

    # without the reduction, process 0 would end as one process trained on its half of every batch: that is
    # told apart from the whole batch's weights by the tolerance above (so the test fails if the reduction goes)
    import edge_steer.steering.finetune as ft
    from edge_steer.models.distributed import DataParallel
    whole = ft.batches
    monkeypatch.setattr(ft, "batches", lambda *a: (DataParallel(0, 2).shard(b) for b in whole(*a)))
    half = one_process("steer", demos, tmp_path / "half")
    with pytest.raises(AssertionError, match="differs"):
        assert_same(half, ones["steer"], "steer")


def test_ddp_reduces_only_the_trainable_tensors(tmp_path):
    """A steer run's DDP holds the head slices only: the frozen weights are never sent."""
    import torch.distributed as dist

    from edge_steer.models.distributed import DataParallel, Replicated, Sharded, for_training
    from edge_steer.steering.finetune import SteerParams, head_slices
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = tiny_model()
        params = SteerParams(model, head_slices(model, [PLANTED], "qo")).parameters()
        run = for_training(model, params, DataParallel(0, 1))
        assert isinstance(run, Replicated)
        sent = run.loss._get_ddp_logging_data()["total_parameter_size_bytes"]
        trainable = sum(p.numel() * p.element_size() for p in params)
        frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        assert sent == trainable and frozen > 10 * trainable
        full = tiny_model()
        assert isinstance(for_training(full, list(full.parameters()), DataParallel(0, 1)), Sharded)
    finally:
        dist.destroy_process_group()


def test_each_process_trains_on_its_own_rows_of_every_batch():
    from edge_steer.models.distributed import DataParallel, loss_weight
    batch = {"action": np.arange(8), "task": ["a"] * 4 + ["b"] * 4, "t": torch.arange(8), "chunk": 4}
    halves = [DataParallel(r, 2).shard(batch) for r in (0, 1)]
    assert [h["action"].tolist() for h in halves] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [h["task"] for h in halves] == [["a"] * 4, ["b"] * 4] and halves[1]["t"].tolist() == [4, 5, 6, 7]
    assert halves[0]["chunk"] == 4
    # a shard's loss is a mean over its valid action steps: that count, over the batch's, scales its loss, so the
    # frameworks' plain mean of the processes' gradients is the whole batch's
    pad = np.array([[False, True], [True, True], [False, False], [False, False]])
    padded = {"action_is_pad": pad, "x": np.zeros(4)}
    assert loss_weight(padded) == 5.0
    scales = [DataParallel(r, 2).loss_scale(DataParallel(r, 2).shard(padded), padded) for r in (0, 1)]
    assert scales == [2 * 1 / 5, 2 * 4 / 5] and sum(scales) == 2
    with pytest.raises(ValueError, match="multiple of the process count"):
        DataParallel(0, 3).shard(batch)
