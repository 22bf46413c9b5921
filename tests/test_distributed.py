"""`finetune` under torchrun: two CPU processes (gloo), each on half of every global batch with the trainable
parameters' gradients averaged, end with the same weights as one process on the whole batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steering_fixtures import LEFT, PLANTED, tiny_model, write_demos

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
    demos = write_demos(tmp_path / "demos", tasks=(LEFT,))
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
    for k in one:   # float32, summed in another order: equal to 1e-5 of the weights' scale
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs")
