"""`edge-steer bench adapt --quick` runs end to end (tiny model, few episodes), so the benchmark
cannot silently break."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from typer.testing import CliRunner

from edge_steer.bench.adapt import PERTURBATIONS, Cell, summarise
from edge_steer.cli import app
from steering_fixtures import tiny_model

runner = CliRunner()


def stand_ins(monkeypatch, success, seed_of=lambda seed, i: i) -> list[dict]:
    """The benchmark's own loop with stand-ins for the fine-tune (a model folder, nothing trained), the demo
    count and the rollouts: episode `i` of a cell succeeds when `success(load, i)`. Returns the fine-tunes' args."""
    from types import SimpleNamespace

    import edge_steer.bench.adapt as adapt
    import edge_steer.sim.rollout as rollout

    fits = []

    def fake_finetune(args):
        fits.append(args)
        (Path(args["out"]) / "model").mkdir(parents=True, exist_ok=True)
        return {"trainable_params": 1, "finetune_s": 0.0, "peak_rss_mb": 0.0, "final_loss": 0.1, "heads": [],
                "model_dir": str(Path(args["out"]) / "model")}

    monkeypatch.setattr(adapt, "_finetune_job", fake_finetune)
    monkeypatch.setattr(adapt, "_demo_count", lambda root: 99)
    monkeypatch.setattr(rollout, "evaluate", lambda load, tasks, n, seed, workers=1, first=0: [
        SimpleNamespace(success=success(load, first + i), seed=seed_of(seed, first + i), steps=10) for i in range(n)])
    return fits


def test_quick_adaptation_benchmark_end_to_end(tmp_path):
    m = tiny_model(language="minilm")
    m.save_pretrained(tmp_path / "base")
    args = ["bench", "adapt", "--quick", "--model", tmp_path / "base", "--out", tmp_path / "run", "--shots", "2",
            "--episodes", "2", "--steps", "3", "--methods", "zero-shot,steer,lora", "--docs", tmp_path / "docs" / "results.md"]
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    cells = json.loads((tmp_path / "run" / "cells.json").read_text())
    assert {c["method"] for c in cells} == {"zero-shot", "steer", "lora"}
    assert all(c["episodes"] == 2 for c in cells)
    steer = next(c for c in cells if c["method"] == "steer")
    lora = next(c for c in cells if c["method"] == "lora")
    assert 0 < steer["trainable_params"] < lora["trainable_params"] and steer["heads"]
    assert steer["peak_rss_mb"] > 50
    doc = (tmp_path / "docs" / "results.md").read_text()
    assert "## Few-shot adaptation (quick)" in doc and "| 2 | steer |" in doc
    assert (tmp_path / "docs" / "adapt_success_vs_k.png").stat().st_size > 5000
    assert (tmp_path / "docs" / "results" / "run_cells.json").read_text() == (tmp_path / "run" / "cells.json").read_text()
    # --report renders what is measured, even where the config asks for more (here 9 episodes), and runs nothing
    measured = (tmp_path / "run" / "cells.json").read_text()
    (tmp_path / "docs" / "results.md").unlink()
    res = runner.invoke(app, [str(a) for a in args[:-4] + ["--episodes", "9", "--docs", tmp_path / "docs" / "results.md",
                                                           "--report"]])
    assert res.exit_code == 0 and "seed 0:" not in res.output and "extended" not in res.output, res.output
    assert (tmp_path / "run" / "cells.json").read_text() == measured
    doc = (tmp_path / "docs" / "results.md").read_text()
    assert "from the cells measured so far" in doc and "| 2 | steer |" in doc and "9 evaluation episodes" in doc
    res = runner.invoke(app, ["bench", "adapt", "--report", "--out", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "no measured cells" in res.output, res.output
    # resumable: a second run finds every cell done and trains nothing
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0 and "recording" not in res.output and "seed 0:" not in res.output
    # asking for robustness later runs only the perturbations, on the saved fine-tuned models
    res = runner.invoke(app, [str(a) for a in args + ["--perturb-episodes", "1"]])
    assert res.exit_code == 0, res.output
    assert "recording" not in res.output and "seed 0:" not in res.output and "robustness: dim_light" in res.output
    cells = json.loads((tmp_path / "run" / "cells.json").read_text())
    assert all(set(c["robustness"]) == set(PERTURBATIONS) for c in cells)
    assert all(r[1] == 1 for c in cells for r in c["robustness"].values())
    assert (tmp_path / "run" / "adapt_robustness.png").exists()
    # more episodes later extend every cell on its saved model with the next scenes; nothing is trained
    before = {(c["method"], c["arm"]): c for c in cells}
    res = runner.invoke(app, [str(a) for a in args[:-2] + ["--episodes", "3"]])
    assert res.exit_code == 0 and "seed 0 extended: " in res.output and "recording" not in res.output, res.output
    cells = json.loads((tmp_path / "run" / "cells.json").read_text())
    for c in cells:
        old = before[(c["method"], c["arm"])]
        assert c["episodes"] == 3 and len(c["episode_log"]) == 3 and c["episode_log"][:2] == old["episode_log"]
        assert c["episode_log"][2]["seed"] not in {e["seed"] for e in old["episode_log"]}
        assert c["successes"] == sum(e["success"] for e in c["episode_log"])
        assert c["finetune_s"] == old["finetune_s"] and c["robustness"] == old["robustness"]
    # a cell whose model is gone is not extended on a different model: skipped with a message, or fitted again
    import shutil
    run_dirs = list((tmp_path / "run" / "runs").glob("*_steer_main_s0"))
    assert len(run_dirs) == 1
    shutil.rmtree(run_dirs[0] / "model")
    res = runner.invoke(app, [str(a) for a in args[:-2] + ["--episodes", "4"]])
    assert res.exit_code == 0 and "--refit fits it again" in res.output, res.output
    cells = {c["method"]: c for c in json.loads((tmp_path / "run" / "cells.json").read_text())}
    assert cells["steer"]["episodes"] == 3 and cells["lora"]["episodes"] == 4 and cells["zero-shot"]["episodes"] == 4
    res = runner.invoke(app, [str(a) for a in args[:-2] + ["--episodes", "4", "--refit"]])
    assert res.exit_code == 0 and "fitting again for 4 episodes (its model is gone" in res.output, res.output
    cells = json.loads((tmp_path / "run" / "cells.json").read_text())   # no perturbations asked, none promised
    steer = [c for c in cells if c["method"] == "steer"]
    assert len(steer) == 1 and steer[0]["episodes"] == 4 and steer[0]["robustness"] == {}
    assert (run_dirs[0] / "model").exists() and len(cells) == 3
    # a larger K later finds the 2-demo set too small and records it again at 3, instead of training on 2;
    # but only once a fit needs it: zero-shot alone records nothing
    res = runner.invoke(app, [str(a) for a in args[:-6] + ["--shots", "2,3", "--methods", "zero-shot"]])
    assert res.exit_code == 0 and "recording" not in res.output, res.output
    res = runner.invoke(app, [str(a) for a in args[:-6] + ["--shots", "3", "--methods", "lora"]])
    assert res.exit_code == 0 and "recording 3 demos" in res.output, res.output
    info = json.loads((tmp_path / "run" / "demos" / "purple_cylinder_in_yellow_bowl_seed0" / "meta" / "info.json").read_text())
    assert info["total_episodes"] == 3


def test_summary_pools_episodes_with_wilson_intervals():
    cells = [Cell("v", "entity", 5, "steer", s, successes=k, episodes=10) for s, k in [(0, 8), (1, 6)]]
    cells.append(Cell("v", "entity", 5, "zero-shot", 0, successes=0, episodes=10))
    rows = {r["method"]: r for r in summarise(cells)["rows"]}
    assert rows["steer"]["success"] == 0.7 and rows["steer"]["n"] == 20
    lo, hi = rows["steer"]["ci"]
    assert lo < 0.7 < hi and rows["zero-shot"]["ci"][0] == 0.0


def test_learning_rate_arms_run_for_every_method_and_are_reported_per_method():
    from edge_steer.bench.adapt import AdaptConfig, ablation_arms, markdown

    cfg = AdaptConfig(ablations=True, arms=("lr=0.003",))
    assert ablation_arms(cfg) == [("main", {}), ("lr=0.003", {"lr": 3e-3})]
    cells = [Cell("v", "entity", 10, m, 0, arm, successes=k, episodes=20)
             for m, arm, k in [("steer", "main", 4), ("steer", "lr=0.003", 9), ("lora", "main", 5), ("lora", "lr=0.003", 2),
                               ("full", "main", 1)]]
    cells.append(Cell("v", "entity", 10, "steer", 1, "main", successes=20, episodes=20))   # another seed: not an ablation row
    abl = {a["arm"]: a for a in summarise(cells)["ablations"]}
    assert set(abl) == {"lr=0.003", "main", "lora: lr=0.003", "lora: main"}   # full has no changed arm
    assert abl["lr=0.003"]["success"] == 0.45 and abl["main"]["n"] == 20
    assert abl["lora: lr=0.003"]["success"] == 0.1 and abl["lora: main"]["method"] == "lora"
    assert "| lora: lr=0.003 | 10.0 % |" in markdown(summarise(cells), cfg, "cmd", "abc")


def test_zero_shot_never_runs_an_ablation_arm_and_other_fine_tunes_only_lr_arms():
    from edge_steer.bench.adapt import AdaptConfig, ablation_arms, method_arms

    arms = ablation_arms(AdaptConfig(ablations=True))
    assert [a for a, _ in method_arms(arms, "zero-shot")] == ["main"]
    assert [a for a, _ in method_arms(arms, "lora")] == ["main", "lr=0.003", "lr=0.0001"] == \
        [a for a, _ in method_arms(arms, "full")]
    assert method_arms(arms, "steer") == arms and len(arms) > 5


def test_an_ablation_is_compared_with_the_main_arm_on_its_own_cells():
    """A results file holding K=5 and K=10 runs, with the random-head arm run at K=10 only: its reference
    is the main arm at K=10 on the same variants and seed, not the file's smallest K."""
    cells = [Cell("a", "entity", 5, "steer", 0, "main", successes=1, episodes=20),
             Cell("a", "entity", 10, "steer", 0, "main", successes=12, episodes=20),
             Cell("b", "spatial", 10, "steer", 0, "main", successes=8, episodes=20),
             Cell("b", "spatial", 10, "steer", 1, "main", successes=20, episodes=20),   # no ablation on seed 1
             Cell("a", "entity", 10, "steer", 0, "select=random", successes=3, episodes=20),
             Cell("b", "spatial", 10, "steer", 0, "select=random", successes=5, episodes=20)]
    abl = {a["arm"]: a for a in summarise(cells)["ablations"]}
    assert abl["main"]["n"] == 40 and abl["main"]["success"] == 0.5
    assert abl["select=random"]["success"] == 0.2


def test_robustness_runs_for_main_and_grid_arms_only():
    from edge_steer.bench.adapt import AdaptConfig, measures_robustness
    cfg = AdaptConfig(ablations=True, arms=("k=2",), perturb_episodes=5,
                      grid_arms=("full:lr=0.0001", "steer:whole=stem.0"))
    assert measures_robustness(cfg, "lora", "main", 5) and measures_robustness(cfg, "steer", "whole=stem.0", 10)
    assert measures_robustness(cfg, "full", "lr=0.0001", 20) and not measures_robustness(cfg, "lora", "lr=0.0001", 20)
    assert not measures_robustness(cfg, "steer", "k=2", 10)                      # a sweep's arm, even when named
    assert not measures_robustness(replace(cfg, perturb_episodes=0), "steer", "main", 10)   # none asked
    # at one K only, if asked; zero-shot (one cell per variant and seed, whatever K) at any
    at20 = replace(cfg, perturb_shots=20)
    assert measures_robustness(at20, "lora", "main", 20) and not measures_robustness(at20, "lora", "main", 10)
    assert not measures_robustness(at20, "steer", "whole=stem.0", 5) and measures_robustness(at20, "zero-shot", "main", 10)


def test_grid_arms_are_parsed_per_method_and_bad_ones_refused():
    from edge_steer.bench.adapt import AdaptConfig, grid_arms

    cfg = AdaptConfig(grid_arms=("steer:whole=stem.0", "full:lr=0.0001", "steer:whole=stem.0&select=random",
                                 "full:lr=0.0001"))
    assert grid_arms(cfg) == {"steer": [("whole=stem.0", {"whole": ("stem.0",)}),
                                        ("whole=stem.0&select=random", {"whole": ("stem.0",), "selection": "random"})],
                              "full": [("lr=0.0001", {"lr": 1e-4})]}
    # lora and full take learning-rate arms only; zero-shot trains nothing; a bare arm names no method
    for bad in ("lora:k=3", "full:whole=stem.0", "zero-shot:lr=0.001", "whole=stem.0", "steer:k=0", "tune:lr=0.001"):
        with pytest.raises(ValueError, match="unknown grid arms"):
            grid_arms(AdaptConfig(grid_arms=(bad,)))


def test_grid_arms_run_on_every_k_and_seed_and_ablations_on_one(tmp_path, monkeypatch):
    """Which cells one command makes: main and grid arms everywhere, sweeps at the ablation K and first
    seed only; the fine-tune and the rollouts are stand-ins, the loop is the benchmark's own."""
    import edge_steer.bench.adapt as adapt

    fits = stand_ins(monkeypatch, lambda load, i: i % 2 == 0, seed_of=lambda seed, i: seed * 1000 + i)
    cfg = adapt.AdaptConfig.quick(shots=(5, 10), seeds=(0, 1), episodes=2, methods=("zero-shot", "steer", "full"),
                            ablations=True, arms=("k=3",), ablation_shots=10,
                            grid_arms=("steer:select=random", "full:lr=0.0001"), perturb_episodes=1)
    cells = adapt.run(cfg, tmp_path)
    got = {(c.shots, c.method, c.arm, c.seed) for c in cells}
    every = {(k, s) for k in (5, 10) for s in (0, 1)}
    assert got == ({(5, "zero-shot", "main", s) for s in (0, 1)}
                   | {(k, m, a, s) for k, s in every for m, a in [("steer", "main"), ("full", "main"),
                                                                   ("steer", "select=random"), ("full", "lr=0.0001")]}
                   | {(10, "steer", "k=3", 0)})
    assert len(fits) == len(cells) - 2
    assert {f["selection"] for f in fits if f["method"] == "steer"} == {"attribution", "random"}
    assert {f["lr"] for f in fits if f["method"] == "full"} == {1e-3, 1e-4}
    # grid arms are measured under the perturbations like the main arms; the sweep's arm is not
    assert all(set(c.robustness) == set(PERTURBATIONS) for c in cells if c.arm != "k=3")
    assert next(c for c in cells if c.arm == "k=3").robustness == {}
    # the summary gives grid arms rows of their own beside the methods; the sweep stays an ablation row
    summary = summarise(cells, cfg.grid_arms)
    assert {r["method"] for r in summary["rows"]} == {"zero-shot", "steer", "full", "steer:select=random",
                                                       "full:lr=0.0001"}
    assert {a["arm"] for a in summary["ablations"]} == {"k=3", "main"}
    # a slice of the grid at a K the sweeps do not run at runs the main and grid arms, and says so
    said = []
    more = adapt.run(replace(cfg, shots=(20,), seeds=(0,)), tmp_path, say=said.append)
    assert {(c.shots, c.method, c.arm) for c in more if c.shots == 20} == {
        (20, "steer", "main"), (20, "full", "main"), (20, "steer", "select=random"), (20, "full", "lr=0.0001")}
    assert len([c for c in more if c.method == "zero-shot"]) == 2      # K-independent: not evaluated again at K = 20
    assert any("ablation arms run at K = 10" in line for line in said)


def test_sweeps_run_on_their_own_seeds_and_episodes_and_are_paired_with_the_main_arms_first_scenes(tmp_path, monkeypatch):
    """--ablation-seeds / --ablation-episodes: sweeps on several seeds with fewer episodes than the grid; the
    ablation table's main-arm reference counts only the scenes the sweeps ran."""
    import edge_steer.bench.adapt as adapt

    # the main arm fails its first two scenes and solves the rest; every other arm solves everything
    stand_ins(monkeypatch, lambda load, i: "_steer_main_" not in Path(load.args[0]).parent.name or i >= 2)
    cfg = adapt.AdaptConfig.quick(shots=(5,), seeds=(0, 1, 2), episodes=6, methods=("steer",), ablations=True,
                                  arms=("k=3",), ablation_seeds=(0, 2), ablation_episodes=2)
    cells = adapt.run(cfg, tmp_path)
    got = {(c.arm, c.seed): c.episodes for c in cells}
    assert got == {("main", 0): 6, ("main", 1): 6, ("main", 2): 6, ("k=3", 0): 2, ("k=3", 2): 2}
    rows = {a["arm"]: a for a in summarise(cells)["ablations"]}
    assert (rows["k=3"]["n"], rows["k=3"]["success"]) == (4, 1.0)
    assert (rows["main"]["n"], rows["main"]["success"]) == (4, 0.0)    # seeds 0 and 2, first two scenes each
    text = adapt.markdown(summarise(cells), cfg, "cmd", "abc")
    assert "seeds 0, 2, 2 episodes per cell" in text
    # a run whose seeds miss the sweep seeds says so and runs the main arm only
    said = []
    adapt.run(replace(cfg, seeds=(1,)), tmp_path, say=said.append)
    assert any("run on seeds [0, 2]" in line for line in said)


def test_dry_run_counts_what_is_left_and_runs_and_writes_nothing(tmp_path, monkeypatch):
    import edge_steer.bench.adapt as adapt
    import edge_steer.sim.demos as demos
    import edge_steer.sim.rollout as rollout

    def never(*a, **k):
        raise AssertionError("a dry run ran something")

    for module, name in [(adapt, "_finetune_job"), (rollout, "evaluate"), (demos, "generate_demos")]:
        monkeypatch.setattr(module, name, never)
    done = [Cell("purple_cylinder_in_yellow_bowl", "entity", 5, "steer", 0, successes=3, episodes=4,
                 episode_log=[{"seed": i, "success": i < 3, "steps": 9} for i in range(4)]),
            Cell("purple_cylinder_in_yellow_bowl", "entity", 5, "lora", 0, successes=1, episodes=2)]
    (tmp_path / "cells.json").write_text(json.dumps([c.__dict__ for c in done]))
    before = (tmp_path / "cells.json").read_text()
    cfg = adapt.AdaptConfig.quick(seeds=(0, 1), episodes=4, methods=("zero-shot", "steer", "lora"), perturb_episodes=1)
    said = []
    adapt.run(cfg, tmp_path, say=said.append, dry_run=True)
    # seed 0: steer has its episodes but not the robustness runs asked, lora is short of episodes, and both
    # models are gone (left without --refit, so seed 0 fits nothing and needs no demos); zero-shot new;
    # seed 1: all three new, each with its robustness runs
    untimed = "; no cell here is timed yet (cells from before 2026-12-07 are not), so no estimate"
    assert said == ["dry run, nothing run or written; left to do: 2 cells short of episodes or robustness runs, left "
                    f"without --refit, 1 demo sets, 16 episodes, 1 lora fine-tunes, {4 * len(PERTURBATIONS)} perturbed "
                    "episodes, 1 steer fine-tunes" + untimed]   # 4 cells, each run once under every perturbation
    assert (tmp_path / "cells.json").read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["cells.json"]
    said.clear()
    adapt.run(replace(cfg, refit=True), tmp_path, say=said.append, dry_run=True)
    assert said == ["dry run, nothing run or written; left to do: 2 demo sets, 24 episodes, 2 lora fine-tunes, "
                    f"{6 * len(PERTURBATIONS)} perturbed episodes, 2 steer fine-tunes" + untimed]


def test_dry_run_estimates_the_time_left_from_the_rates_its_cells_measured(tmp_path, monkeypatch):
    import edge_steer.bench.adapt as adapt

    stand_ins(monkeypatch, lambda load, i: i == 0)
    cfg = adapt.AdaptConfig.quick(episodes=3, methods=("zero-shot", "steer", "lora"), perturb_episodes=1)
    cells = adapt.run(cfg, tmp_path)
    # every evaluation episode of a run is timed, clean and perturbed alike, and the cells say on which machine
    assert [(c.method, c.eval_episodes) for c in cells] == [
        ("zero-shot", 3 + len(PERTURBATIONS)), ("steer", 3 + len(PERTURBATIONS)), ("lora", 3 + len(PERTURBATIONS))]
    assert all(c.eval_s > 0 for c in cells) and {c.machine for c in cells} == {adapt.this_machine()}
    # set the rates by hand: 10 s an episode, steer fits of 60 and 120 s (median 120), no LoRA fit timed; and
    # cells of a 100x slower machine, which must not move an estimate made where this machine has rates
    file = tmp_path / "cells.json"
    rows = json.loads(file.read_text())
    for row in rows:
        row["eval_s"], row["eval_episodes"] = 10.0 * row["eval_episodes"], row["eval_episodes"]
        row["finetune_s"] = 0.0 if row["method"] == "lora" else row["finetune_s"]
    steer = next(r for r in rows if r["method"] == "steer")
    rows += [{**steer, "seed": 7, "finetune_s": 60.0}, {**steer, "seed": 8, "finetune_s": 120.0}]
    slow = [{**r, "seed": 20 + i, "machine": "a slow one", "eval_s": 1000.0 * r["eval_episodes"],
             "finetune_s": 9000.0} for i, r in enumerate(rows)]
    file.write_text(json.dumps(rows + slow))
    said = []
    adapt.run(replace(cfg, seeds=(1,)), tmp_path, say=said.append, dry_run=True)
    per_cell = 3 + len(PERTURBATIONS)
    minutes = (10.0 * 3 * per_cell + 120.0) / 60   # seed 1: three new cells, + one steer fit at the median; LoRA untimed
    assert said[-1].endswith(f"; about {minutes:.0f} min at the rates these cells measured on this machine (10.0 s an "
                             f"episode over {5 * per_cell} timed episodes, each method's median fit), not counting "
                             "lora fine-tunes"), said[-1]
    # on a machine that has timed nothing, every cell's rates, and it says they are other machines'
    monkeypatch.setattr(adapt, "this_machine", lambda: "a new one")
    said.clear()
    adapt.run(replace(cfg, seeds=(1,)), tmp_path, say=said.append, dry_run=True)
    assert "measured on other machines (none timed on this one) (505.0 s an episode" in said[-1], said[-1]


def test_report_marks_fit_times_that_pool_machines():
    """Fit seconds from VMs 3x apart are not one rate: a row that averages over machines says so."""
    import edge_steer.bench.adapt as adapt

    one = [Cell("purple_cylinder_in_yellow_bowl", "entity", 5, "steer", s, successes=1, episodes=2, finetune_s=30.0,
                machine="A") for s in (0, 1)]
    text = adapt.markdown(summarise(one), adapt.AdaptConfig.quick(), "cmd", "abc")
    assert "| 30 | " in text and "†" not in text
    for other in ("B", ""):     # another machine, or a cell that does not say which
        mixed = one + [replace(one[0], seed=2, finetune_s=90.0, machine=other)]
        text = adapt.markdown(summarise(mixed), adapt.AdaptConfig.quick(), "cmd", "abc")
        assert "| 50 † | " in text and "† fit times over more than one machine" in text


def test_cells_name_their_base_model_and_cells_of_another_are_refused_not_pooled(tmp_path, monkeypatch):
    """A new default checkpoint must not extend or be pooled with cells measured on the old one."""
    import sys

    import edge_steer.bench.adapt as adapt
    from edge_steer.models import load_model

    stand_ins(monkeypatch, lambda load, i: True)
    cfg = adapt.AdaptConfig.quick(episodes=2, methods=("zero-shot", "steer"))
    fp = load_model().fingerprint()
    cells = adapt.run(cfg, tmp_path)
    assert len(cells) == 2 and {c.base_model for c in cells} == {fp}
    assert adapt.markdown(summarise(cells), cfg, "cmd", "abc").count(f"fingerprint): {fp[:12]}.") == 1
    # the same cells, as if measured on other weights: refused before anything runs, dry run or not
    file = tmp_path / "cells.json"
    theirs = [replace(c, base_model="f" * 64) for c in cells]
    file.write_text(json.dumps([c.__dict__ for c in theirs]))
    before = file.read_text()
    for dry in (False, True):
        with pytest.raises(adapt.ForeignCells, match=f"2 on ffffffffffff\\); this run's is {fp[:12]}"):
            adapt.run(replace(cfg, episodes=3), tmp_path, dry_run=dry)
    assert file.read_text() == before
    res = runner.invoke(app, ["bench", "adapt", "--quick", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "another base model" in res.output, res.output
    # cells from before fingerprints were kept are adopted once, said so, and written back marked
    file.write_text(json.dumps([replace(c, base_model="").__dict__ for c in cells]))
    said = []
    again = adapt.run(cfg, tmp_path, say=said.append)
    assert [c.episodes for c in again] == [2, 2] and any("carry no base-model fingerprint" in s for s in said)
    assert {c["base_model"] for c in json.loads(file.read_text())} == {fp}
    # the comparison tool will not pair cells of two base models either
    file.write_text(json.dumps([cells[0].__dict__, theirs[1].__dict__]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import compare_adapt
    monkeypatch.setattr(sys, "argv", ["compare_adapt", str(file), "--shots", "5", "--seeds", "0"])
    with pytest.raises(SystemExit, match="more than one base model: 1 on .*, 1 on ffffffffffff"):
        compare_adapt.main()


def test_a_run_killed_while_saving_leaves_the_last_complete_cells(tmp_path, monkeypatch):
    """Sessions end abruptly: a kill while cells.json is being written must not tear the file that holds hours of
    cells; the run then resumes from the last complete one."""
    import edge_steer.bench.adapt as adapt
    import edge_steer.files as files

    stand_ins(monkeypatch, lambda load, i: True)
    cfg = adapt.AdaptConfig.quick(episodes=2, methods=("zero-shot", "steer"))
    real, saves = files.os.replace, []

    def killed_on_the_second_save(src, dst):
        if Path(dst).name == "cells.json":   # count only the benchmark's saves, whatever else renames files
            saves.append(dst)
            if len(saves) == 2:
                raise KeyboardInterrupt   # the new text is written, but not yet in place of the old
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", killed_on_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        adapt.run(cfg, tmp_path)
    kept = json.loads((tmp_path / "cells.json").read_text())
    assert [c["method"] for c in kept] == ["zero-shot"]
    monkeypatch.setattr(files.os, "replace", real)
    assert [c.method for c in adapt.run(cfg, tmp_path)] == ["zero-shot", "steer"]


def test_arms_outside_the_default_sweeps_are_parsed_by_name_and_bad_ones_refused(tmp_path):
    from edge_steer.bench.adapt import AdaptConfig, ablation_arms, run
    from edge_steer.steering.finetune import FinetuneError

    cfg = AdaptConfig(ablations=True, arms=("whole=keypoint_maps+stem.0", "k=3", "lr=0.0005", "select=random"))
    assert ablation_arms(cfg) == [("main", {}), ("select=random", {"selection": "random"}),
                                  ("whole=keypoint_maps+stem.0", {"whole": ("keypoint_maps", "stem.0")}),
                                  ("k=3", {"top_k": 3}), ("lr=0.0005", {"lr": 5e-4})]
    # settings joined by '&' make one arm: the recipe's random-head control, the module without heads
    both = ("whole=stem.0&select=random", "whole=stem.0&k=0", "slices=o&k=3")
    assert ablation_arms(AdaptConfig(ablations=True, arms=both))[1:] == [
        ("whole=stem.0&select=random", {"whole": ("stem.0",), "selection": "random"}),
        ("whole=stem.0&k=0", {"whole": ("stem.0",), "top_k": 0}), ("slices=o&k=3", {"slices": "o", "top_k": 3})]
    for bad in ("k=0", "k=two", "lr=5e-4", "whole=", "whole=a+", "depth=3",   # lr names are canonical (%g)
                "k=0&select=random", "k=2&k=3", "select=best&k=2", "slices=qx&k=2", "whole=stem.0&"):
        with pytest.raises(ValueError, match="unknown ablation arms"):
            ablation_arms(AdaptConfig(ablations=True, arms=(bad,)))
    with pytest.raises(ValueError, match="with --ablations"):
        ablation_arms(AdaptConfig(arms=("k=3",)))
    # a module the model lacks is refused before any demo is recorded
    with pytest.raises(FinetuneError, match="no module 'stem.9'"):
        run(AdaptConfig.quick(ablations=True, arms=("whole=stem.9",)), tmp_path)
    assert not (tmp_path / "demos").exists()


def test_compare_adapt_pairs_arms_by_episode_and_plots(tmp_path, capsys, monkeypatch):
    import sys
    from dataclasses import asdict
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import compare_adapt

    assert compare_adapt.sign_test(0, 0) == 1.0
    assert compare_adapt.sign_test(5, 5) == 1.0
    assert abs(compare_adapt.sign_test(9, 1) - 22 / 1024) < 1e-12     # 2 * P(X <= 1), X ~ Bin(10, 1/2)

    def cell(method, arm, wins):   # 10 episodes, seeds 0..9; `wins` is the set that succeeded
        log = [{"seed": s, "success": s in wins, "steps": 1} for s in range(10)]
        return Cell("purple_cylinder_in_yellow_bowl", "entity", 10, method, 0, arm, successes=len(wins),
                    episodes=10, trainable_params=100, finetune_s=5.0, episode_log=log)
    cells = [cell("steer", "main", {0, 1, 2}), cell("lora", "main", {0, 1, 2, 3, 4, 5, 6, 7, 8}),
             cell("steer", "k=2", {9})]
    cells[1].robustness = {"dim_light": [1, 4], "distractors": [2, 4], "camera_jitter": [3, 4]}
    (tmp_path / "cells.json").write_text(json.dumps([asdict(c) for c in cells]))
    png = tmp_path / "p.png"
    monkeypatch.setattr(sys, "argv", ["compare_adapt", str(tmp_path / "cells.json"), "--seeds", "0",
                                      "--plot", str(png), "--plot-arms", "steer:main,lora:main",
                                      "--k-plot", str(tmp_path / "k.png")])
    compare_adapt.main()
    paired, perturbed = capsys.readouterr().out.split("under test-time perturbations")
    rows = {line.split()[0]: line.split() for line in paired.splitlines() if line and ":" in line.split()[0]}
    assert rows["lora:main"][-2:] == ["6/0", f"{compare_adapt.sign_test(6, 0):.3f}"]   # episodes 3-8 only LoRA solves
    assert rows["steer:k=2"][-2:] == ["1/3", "0.625"]
    # these cells do not say which machine fitted them: their fit-time ranges are marked and the mark explained
    assert "5†" in rows["lora:main"] and paired.count("†") == 4 and "more than one machine" in paired
    # only LoRA ran the perturbations: its row, clean then dim / distractors / jitter
    assert [line.split()[0] for line in perturbed.splitlines() if "%" in line] == ["lora:main"]
    assert "9/10 90.0 %" in perturbed and "1/4 25.0 %" in perturbed and "3/4 75.0 %" in perturbed
    assert png.stat().st_size > 1000 and (tmp_path / "k.png").stat().st_size > 1000
    monkeypatch.setattr(sys, "argv", ["compare_adapt", str(tmp_path / "cells.json"), "--seeds", "0",
                                      "--plot-arms", "steer:main,full:main", "--k-plot", str(tmp_path / "k2.png")])
    with pytest.raises(SystemExit, match="no K at which"):   # full never ran: no K to draw, said so
        compare_adapt.main()
    robust = tmp_path / "r.png"
    monkeypatch.setattr(sys, "argv", ["compare_adapt", str(tmp_path / "cells.json"), "--seeds", "0",
                                      "--plot-arms", "lora:main", "--robust-plot", str(robust)])
    compare_adapt.main()
    assert robust.stat().st_size > 1000
    monkeypatch.setattr(sys, "argv", ["compare_adapt", str(tmp_path / "cells.json"), "--seeds", "0",
                                      "--plot-arms", "lora:main,steer:main", "--robust-plot", str(robust)])
    with pytest.raises(SystemExit, match=r"steer', 'main'\)\] lack robustness runs"):   # steer never ran them
        compare_adapt.main()
    for c in cells:   # fitted on one machine: nothing to mark
        c.machine = "AMD EPYC, 2 cores, AVX512"
    (tmp_path / "cells.json").write_text(json.dumps([asdict(c) for c in cells]))
    monkeypatch.setattr(sys, "argv", ["compare_adapt", str(tmp_path / "cells.json"), "--seeds", "0"])
    capsys.readouterr()
    compare_adapt.main()
    out = capsys.readouterr().out
    assert "  5-  5 " in out and "†" not in out


def test_compare_adapt_first_pools_every_arm_over_the_same_first_scenes(tmp_path, capsys, monkeypatch):
    import sys
    from dataclasses import asdict
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import compare_adapt

    def cell(arm, n, wins):   # n episodes, seeds 0..n-1; `wins` is the set that succeeded
        log = [{"seed": s, "success": s in wins, "steps": 1} for s in range(n)]
        return Cell("purple_cylinder_in_yellow_bowl", "entity", 10, "steer", 0, arm, successes=len(wins),
                    episodes=n, trainable_params=100, finetune_s=5.0, episode_log=log)
    # the reference ran 50 episodes and solves only scenes 20-49; the arm ran the first 20 and solves two
    (tmp_path / "cells.json").write_text(json.dumps([asdict(cell("main", 50, set(range(20, 50)))),
                                                     asdict(cell("k=2", 20, {0, 1}))]))
    for extra, want in (([], "30/50"), (["--first", "20"], "0/20")):
        monkeypatch.setattr(sys, "argv", ["compare_adapt", str(tmp_path / "cells.json"), "--seeds", "0", *extra])
        compare_adapt.main()
        rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
                if line and ":" in line.split()[0]}
        assert rows["steer:main"][2] == want   # name, the one variant, pooled
        assert rows["steer:k=2"][2] == "2/20" and rows["steer:k=2"][-2:] == ["2/0", "0.500"]
    # --skip 20: only scenes 20-49, which the 20-episode arm never ran: the reference alone, all 30 solved
    monkeypatch.setattr(sys, "argv", ["compare_adapt", str(tmp_path / "cells.json"), "--seeds", "0", "--skip", "20"])
    compare_adapt.main()
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line and ":" in line.split()[0]}
    assert rows["steer:main"][2] == "30/30" and "steer:k=2" not in rows


def test_compare_adapt_variants_keeps_only_the_named_variants(tmp_path, capsys, monkeypatch):
    import sys
    from dataclasses import asdict
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import compare_adapt

    def cell(variant, arm, wins):   # 10 episodes, seeds 0..9
        log = [{"seed": s, "success": s in wins, "steps": 1} for s in range(10)]
        return Cell(variant, "entity", 10, "steer", 0, arm, successes=len(wins), episodes=10,
                    trainable_params=100, finetune_s=5.0, episode_log=log)
    cells = [cell(v, a, w) for v, a, w in (("purple_cylinder_in_yellow_bowl", "main", {0, 1}),
                                          ("purple_cylinder_in_yellow_bowl", "k=2", {0, 1, 2}),
                                          ("orange_sphere_on_blue_plate", "main", {0, 1, 2, 3, 4, 5}))]
    # k=2 ran only the purple cylinder: pooled over both variants it has no row, restricted to purple it has
    (tmp_path / "cells.json").write_text(json.dumps([asdict(c) for c in cells]))
    for extra, want_main, has_k2 in (([], "8/20", False),
                                     (["--variants", "purple_cylinder_in_yellow_bowl"], "2/10", True)):
        monkeypatch.setattr(sys, "argv", ["compare_adapt", str(tmp_path / "cells.json"), "--seeds", "0", *extra])
        compare_adapt.main()
        out = capsys.readouterr().out
        rows = {line.split()[0]: line.split() for line in out.splitlines() if line and ":" in line.split()[0]}
        assert want_main in rows["steer:main"]
        assert ("steer:k=2" in rows) == has_k2
    monkeypatch.setattr(sys, "argv", ["compare_adapt", str(tmp_path / "cells.json"), "--variants", "nope"])
    with pytest.raises(SystemExit, match="no cells for variants"):
        compare_adapt.main()


def test_robustness_drops_are_measured_against_the_same_scenes_clean():
    """A perturbation runs on a cell's first scenes (and only on some cells); its drop must be taken against
    clean success on those scenes, not against the row's whole clean rate."""
    from edge_steer.bench.adapt import AdaptConfig, markdown

    log = [{"seed": i, "success": i < 10, "steps": 9} for i in range(50)]   # first 10 all succeed, then none
    with_rob = Cell("purple_cylinder_in_yellow_bowl", "entity", 20, "steer", 0, successes=10, episodes=50,
                    episode_log=log, robustness={"distractors": [6, 10]})
    without = Cell("orange_sphere_on_blue_plate", "entity", 20, "steer", 1, successes=0, episodes=20)
    no_log = Cell("purple_cylinder_in_yellow_bowl", "entity", 20, "lora", 0, successes=25, episodes=50,
                  robustness={"distractors": [3, 10]})
    rows = {r["method"]: r for r in summarise([with_rob, without, no_log])["rows"]}
    steer, lora = rows["steer"], rows["lora"]
    assert steer["success"] == 10 / 70 and steer["robustness"] == {"distractors": 0.6}
    assert steer["robustness_clean"] == {"distractors": 1.0}         # the first 10 scenes, where it ran
    assert lora["robustness_clean"] == {"distractors": 0.5}          # no log: the cell's rate stands in
    text = markdown(summarise([with_rob, without, no_log]), AdaptConfig.quick(), "cmd", "abc")
    assert "| 20 | steer | 14.3 % |" in text and "– / 100 → 60 % / – / –" in text


def test_the_machine_description_names_the_cpu_its_cores_and_widest_vector_units(tmp_path):
    """One description for every benchmark header and every cell: the CPU model and its widest units from
    cpuinfo (the first processor's), and the platform's name where there is no cpuinfo."""
    import os

    from edge_steer.bench.docs import this_machine
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu amx_tile\n")
    assert this_machine(info) == f"Test CPU 9000, {os.cpu_count()} cores, AVX512-BF16"
    info.write_text("model name\t: Old CPU\nflags\t\t: fpu sse4_2\n")
    assert this_machine(info) == f"Old CPU, {os.cpu_count()} cores"
    assert this_machine(tmp_path / "missing").endswith(f", {os.cpu_count()} cores")


def test_nothing_of_ray_or_torch_distributed_is_imported_until_asked():
    """The executors and the distributed helper import Ray and torch.distributed's process group only when a
    cluster run or a torchrun start asks for them: the CLI, the benchmark and the serving path load neither."""
    import subprocess
    import sys
    code = ("import sys, edge_steer.cli, edge_steer.bench.adapt, edge_steer.bench.executors, edge_steer.runtime.daemon, "
            "edge_steer.models.distributed; "
            "from edge_steer.models.distributed import data_parallel; assert data_parallel() is None; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]


def test_a_driver_killed_between_units_resumes_from_the_last_unit_without_fitting_or_counting_twice(tmp_path, monkeypatch):
    """Results are written as each unit finishes: a run killed after a fit and one batch of episodes keeps
    both, and the resumed run fits nothing and runs only the episodes left, each scene once."""
    import edge_steer.bench.adapt as adapt
    import edge_steer.files as files
    from edge_steer.bench.executors import LocalExecutor

    fits = stand_ins(monkeypatch, lambda load, i: i % 2 == 0)
    cfg = adapt.AdaptConfig.quick(episodes=6, methods=("steer",))
    real, saves = files.os.replace, []

    def killed_on_the_third_save(src, dst):
        real(src, dst)
        if Path(dst).name == "cells.json":
            saves.append(dst)
            if len(saves) == 3:          # the fit, then two batches of two episodes, are in the file
                raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", killed_on_the_third_save)
    with pytest.raises(KeyboardInterrupt):
        adapt.run(cfg, tmp_path, executor=LocalExecutor(episode_batch=2))
    kept = json.loads((tmp_path / "cells.json").read_text())
    assert [(c["method"], c["episodes"]) for c in kept] == [("steer", 4)] and len(fits) == 1
    monkeypatch.setattr(files.os, "replace", real)
    cells = adapt.run(cfg, tmp_path, executor=LocalExecutor(episode_batch=2))
    assert len(fits) == 1 and [c.episodes for c in cells] == [6]
    assert [e["seed"] for e in cells[0].episode_log] == list(range(6)) and cells[0].successes == 3


def test_episode_results_are_applied_once_and_in_scene_order():
    """A cluster finishes batches in any order, and a retried task can report twice: a cell counts each scene
    once, in order, and a perturbation once."""
    from edge_steer.bench.adapt import _apply_episodes

    cell = Cell("v", "entity", 5, "steer", 0)
    early: dict = {}
    batch = lambda first: [{"seed": first + i, "success": True, "steps": 1} for i in range(2)]   # noqa: E731
    spec = lambda first: {"perturbation": None, "first": first}                                    # noqa: E731
    assert _apply_episodes(cell, spec(2), batch(2), early) and cell.episodes == 0    # waits for scenes 0-1
    assert not _apply_episodes(cell, spec(2), batch(2), early)                        # the same batch again
    assert _apply_episodes(cell, spec(0), batch(0), early) and cell.episodes == 4
    assert [e["seed"] for e in cell.episode_log] == [0, 1, 2, 3] and cell.successes == 4
    assert not _apply_episodes(cell, spec(0), batch(0), early) and cell.episodes == 4
    dim = {"perturbation": "dim_light", "first": 0}
    assert _apply_episodes(cell, dim, batch(0), early) and not _apply_episodes(cell, dim, batch(0), early)
    assert cell.robustness == {"dim_light": [2, 2]}


def test_the_dry_run_prices_a_plan_on_n_workers_as_a_cluster_runs_it(tmp_path, monkeypatch):
    """On N workers a free worker takes the first unit in plan order whose inputs are done: at 10 s an episode on
    one core and 100 s a fit, zero-shot's four batches of 5 episodes (4 x 50 s), then the steer fit (100 s) and
    its four batches take 500 s on one worker; 200 s on four (the fit waits for a worker behind zero-shot's
    batches); 150 s on five (the fit beside them, then its batches at once)."""
    import edge_steer.bench.adapt as adapt

    stand_ins(monkeypatch, lambda load, i: True)
    timed = [Cell("purple_cylinder_in_yellow_bowl", "entity", 5, m, 9, eval_s=50.0, eval_episodes=10,
                  finetune_s=100.0 if m == "steer" else 0.0, machine=adapt.this_machine().replace(
                      f"{adapt._cores(adapt.this_machine())} cores", "2 cores"), base_model="")
             for m in ("zero-shot", "steer")]                    # 5 s an episode on 2 cores: 10 s on one
    (tmp_path / "cells.json").write_text(json.dumps([c.__dict__ for c in timed]))
    cfg = adapt.AdaptConfig.quick(episodes=20, methods=("zero-shot", "steer"), seeds=(0,))
    monkeypatch.setattr(adapt, "this_machine", lambda: timed[0].machine)
    p = adapt.plan(cfg, tmp_path, episode_batch=5)
    assert [u.kind for u in p.units] == ["eval"] * 4 + ["fit"] + ["eval"] * 4     # the demos are there already
    done = list(p.cells.values())
    assert "on 1 worker: about 8 min for 9 units (10.0 s an episode on one core" in adapt.price(p, done, 1)   # 500 s
    assert adapt.price(p, done, 4).startswith("on 4 workers: about 3 min")                                   # 200 s
    assert adapt.price(p, done, 5).startswith("on 5 workers: about 2 min")                                   # 150 s
    assert adapt.describe(p) == ["purple_cylinder_in_yellow_bowl seed 0: 40 episodes, 1 steer fit, 9 units"]


def test_a_bad_executor_is_refused_in_one_line():
    for args, said in ((["eval", "--task", "purple_cylinder_in_yellow_bowl", "--executor", "bogus"], "unknown executor 'bogus'"),
                       (["bench", "adapt", "--quick", "--ray-address", "127.0.0.1:6379", "--dry-run"],
                        "--ray-address needs --executor ray")):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and said in res.output, res.output
