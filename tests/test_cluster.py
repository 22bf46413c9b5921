"""The Ray executor on a two-node Ray cluster on this machine (Ray's own test utility): `bench adapt --quick`
end to end, a worker killed mid-fit, and the same per-episode outcomes as the local pool. One cluster serves
every test of the module (a start costs seconds on two cores)."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
from ray.cluster_utils import Cluster  # noqa: E402

from steering_fixtures import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False, logging_level="WARNING")
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "model"
    tiny_model().save_pretrained(path)      # hashed-embedding language: no MiniLM to load in every worker
    return path


def _quick(base: Path, out: Path, **kw):
    from edge_steer.bench.adapt import AdaptConfig
    return AdaptConfig.quick(**{"model": str(base), "shots": (2,), "episodes": 2, "steps": 3,
                                "methods": ("zero-shot", "steer", "lora"), **kw})


def test_bench_adapt_quick_runs_on_a_two_node_cluster_and_resumes_to_nothing(cluster, base, tmp_path):
    from typer.testing import CliRunner

    from edge_steer.bench import adapt
    from edge_steer.cli import app

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    args = ["bench", "adapt", "--quick", "--model", str(base), "--out", str(tmp_path), "--shots", "2", "--episodes",
            "2", "--steps", "3", "--methods", "zero-shot,steer,lora", "--executor", "ray"]
    res = CliRunner().invoke(app, args)      # joins the cluster this process is connected to
    assert res.exit_code == 0, res.output
    assert "recording 2 demos" in res.output and "units" in res.output and "2 CPUs" in res.output
    cells = adapt._load_cells(tmp_path / "cells.json")
    assert sorted(c.method for c in cells) == ["lora", "steer", "zero-shot"]
    assert all(c.episodes == 2 and len(c.episode_log) == 2 for c in cells)
    steer = next(c for c in cells if c.method == "steer")
    assert steer.heads and 0 < steer.trainable_params and steer.peak_rss_mb > 50
    # the fitted models and the demo set came back to the driver's disk: a resumed run has nothing left
    assert len(list((tmp_path / "runs").glob("*/model"))) == 2 and (tmp_path / "demos").exists()
    res = CliRunner().invoke(app, args + ["--dry-run"])
    assert res.exit_code == 0 and "left to do: nothing" in res.output, res.output


def test_a_worker_killed_mid_fit_is_retried_and_every_cell_is_counted_once(cluster, base, tmp_path):
    """SIGKILL the worker process running a fit: Ray runs the task again, and cells.json ends with each cell
    once, on exactly its episodes."""
    import psutil

    from edge_steer.bench import adapt
    from edge_steer.bench.executors import RayExecutor

    killed = []

    def kill_a_fit():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for p in psutil.process_iter(["pid", "cmdline"]):
                if "ray::edge_steer.fit" in " ".join(p.info["cmdline"] or []):
                    time.sleep(0.5)             # well inside the fit
                    os.kill(p.info["pid"], signal.SIGKILL)
                    killed.append(p.info["pid"])
                    return
            time.sleep(0.05)

    t = threading.Thread(target=kill_a_fit, daemon=True)
    t.start()
    cells = adapt.run(_quick(base, tmp_path, methods=("lora",)), tmp_path, say=lambda s: None,
                      executor=RayExecutor())
    t.join(timeout=1)
    assert killed, "no fit worker was seen to kill"
    rows = json.loads((tmp_path / "cells.json").read_text())
    assert sorted((r["method"], r["episodes"], len(r["episode_log"])) for r in rows) == [("lora", 2, 2)]
    assert [c.method for c in cells] == [r["method"] for r in rows]


def test_ray_and_the_local_pool_give_the_same_episodes(cluster, base, tmp_path):
    from functools import partial

    from edge_steer.bench.executors import RayExecutor, ray_evaluate
    from edge_steer.models import EdgeVLA
    from edge_steer.sim.rollout import evaluate
    from edge_steer.sim.tasks import get_task

    tasks = [get_task("purple_cylinder_in_yellow_bowl")]
    ex = RayExecutor(episode_batch=2)
    there = ray_evaluate(ex, base, tasks, 3, seed=4)
    here = evaluate(partial(EdgeVLA.from_pretrained, base), tasks, 3, 4, workers=1)
    assert [(r.task, r.seed, r.success, r.steps) for r in there] == [(r.task, r.seed, r.success, r.steps) for r in here]
    # `edge-steer eval --executor ray` is that evaluation, with its per-episode log
    from typer.testing import CliRunner

    from edge_steer.cli import app
    res = CliRunner().invoke(app, ["eval", "--model", str(base), "--task", tasks[0].name, "--episodes", "3", "--seed", "4",
                                   "--executor", "ray", "--out", str(tmp_path / "eval.json")])
    assert res.exit_code == 0, res.output
    log = json.loads((tmp_path / "eval.json").read_text())["episodes"]
    assert [(e["seed"], e["success"], e["steps"]) for e in log] == [(r.seed, r.success, r.steps) for r in here]
