"""Offline vs closed-loop behaviour of a policy on one recorded demo, to tell a perception failure from a
control one: the same scene seed as the demo (first observation identical), offline predictions on the
demo's frames, then the policy's own closed-loop path against the expert's.

    .venv/bin/python tools/diagnose_policy.py --model DIR --data DIR [--episode 0]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from edge_steer.data import Dataset, EpisodeFilter
from edge_steer.models import load_model
from edge_steer.models.vla import SCENE_CENTER, SCENE_SCALE, observation_batch
from edge_steer.sim.demos import scene_targets
from edge_steer.sim.env import EnvConfig, SimEnv
from edge_steer.sim.tasks import get_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", required=True)
    ap.add_argument("--episode", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    m = load_model(args.model)
    ds = Dataset(args.data, EpisodeFilter(episodes=[args.episode]))
    info, ep = ds.episodes[0], ds.episode(args.episode)
    task = get_task(info.extra["task_name"])
    err = [np.abs(m.predict({k: ep[k][t] for k in ep if k.startswith("observation.")}, task.instruction)[0]
                  - ep["action"][t]) for t in range(len(ep["action"]))]
    print("offline |pred - expert| per action dim:", np.mean(err, 0).round(4), " expert std:", ep["action"].std(0).round(4))
    if getattr(m.config, "scene_aux", 0):   # the auxiliary head: where the model thinks the objects are
        truth = scene_targets(ds)[args.episode][:4]
        with torch.no_grad():
            obs0 = {k: ep[k][0] for k in ep if k.startswith("observation.")}
            x = m.trunk(*m.embed(**m.prepare(observation_batch(obs0, task.instruction))))
            guess = (m.scene_readout(x)[0] * SCENE_SCALE + SCENE_CENTER).numpy()
        print(f"scene head on frame 0: pick {guess[:2].round(3)} (true {truth[:2].round(3)}), "
              f"goal {guess[2:].round(3)} (true {truth[2:].round(3)})")
    grasp = int(np.flatnonzero(ep["action"][:, 6] > 0.5)[0])
    print(f"expert closes the gripper at frame {grasp}, TCP {ep['observation.state'][grasp][:3].round(3)}")
    with SimEnv(task, int(info.extra["seed"]), EnvConfig()) as env:
        obs = env.observe()
        same = all(np.array_equal(obs[k], ep[k][0]) for k in obs if k in ep)
        print("closed loop from the demo's scene seed; first observation identical to the demo:", same)
        closed = False
        while env.steps < 150 and not env.success():
            obs = env.observe()
            for a in m.predict(obs, task.instruction)[:5]:
                env.step(a)
                if a[6] >= 0.5 and not closed:
                    closed = True
                    print(f"policy closes the gripper at step {env.steps}, TCP {env.panda.get_position().round(3)}")
        print(f"success: {env.success()} after {env.steps} steps")


if __name__ == "__main__":
    main()
