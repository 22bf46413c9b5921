"""`finetune` under torchrun: two CPU processes (gloo), each on half of every global batch with the trainable
parameters' gradients combined, end with the same weights as one process on the whole batch (and not without
the all-reduce: checked by hand by removing it, when the test was written)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steering_fixtures import PLANTED, tiny_model, write_demos

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

CHILD = """
import sys, torch
sys.path[:0] = [{tests!r}, {root!r}]
from steering_fixtures import PLANTED, tiny_model
from edge_steer.data import Dataset
from edge_steer.models.distributed import is_main
from edge_steer.steering.finetune import FinetuneConfig, finetune, with_train
method, demos, out = sys.argv[1:4]
cfg = with_train(FinetuneConfig(method=method), steps=6, batch_size=8, lr=3e-3, bf16=False, checkpoint_every=10**9)
res = finetune(tiny_model(), Dataset(demos), cfg, out + "/run", heads=[PLANTED], progress=False)
if is_main():
    torch.save({{k: v.detach().clone() for k, v in res.model.state_dict().items()}}, out + "/weights.pt")
"""


def one_process(method: str, demos: Path, out: Path) -> dict[str, torch.Tensor]:
    from edge_steer.data import Dataset
    from edge_steer.steering.finetune import FinetuneConfig, finetune, with_train
    cfg = with_train(FinetuneConfig(method=method), steps=6, batch_size=8, lr=3e-3, bf16=False, checkpoint_every=10**9)
    res = finetune(tiny_model(), Dataset(demos), cfg, out / "run", heads=[PLANTED], progress=False)
    return res.model.state_dict()


@pytest.mark.parametrize("method", ["steer", pytest.param("full", marks=pytest.mark.slow)])   # one code path: full is slow
def test_two_processes_end_with_the_weights_of_one_on_the_same_global_batch(tmp_path, method):
    demos = write_demos(tmp_path / "demos")     # two instructions: the two halves of a batch pull apart
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS), root=str(ROOT)))
    (tmp_path / "two").mkdir()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                          str(script), method, str(demos), str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "weights.pt")
    one = one_process(method, demos, tmp_path / "one")
    base = tiny_model().state_dict()
    moved = [k for k in one if not torch.equal(one[k], base[k])]
    assert moved, "nothing trained: the comparison would prove nothing"
    # a key bias adds the same logit to every key of a query's row, so softmax's gradient to it is zero but for
    # rounding; Adam scales that rounding noise up to full steps, whose signs depend on summation order
    noise = [k for k in one if k.endswith("k_proj.bias")] if method == "full" else []
    for k in one.keys() - set(noise):   # float32, summed in another order: equal to 1e-5 of the weights' scale
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs")


def test_each_process_trains_on_its_own_rows_of_every_batch():
    import numpy as np

    from edge_steer.models.distributed import DataParallel
    batch = {"action": np.arange(8), "task": ["a"] * 4 + ["b"] * 4, "t": torch.arange(8), "chunk": 4}
    halves = [DataParallel(r, 2).shard(batch) for r in (0, 1)]
    assert [h["action"].tolist() for h in halves] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [h["task"] for h in halves] == [["a"] * 4, ["b"] * 4] and halves[1]["t"].tolist() == [4, 5, 6, 7]
    assert halves[0]["chunk"] == 4
    # a shard's loss is a mean over its valid action steps: that count weighs its gradient
    from edge_steer.models.distributed import loss_weight
    assert loss_weight({"action_is_pad": np.array([[False, True], [False, False]]), "x": np.zeros(2)}) == 3.0
    assert loss_weight(halves[0]) == 4.0
    with pytest.raises(ValueError, match="multiple of the process count"):
        DataParallel(0, 3).shard(batch)
