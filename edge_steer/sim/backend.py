"""The sim backend of the serve daemon's robot (runtime/robot.py's BACKENDS["sim"]): a sampled scene of
the configured task, the sim twin of the arm with its 1 kHz loop in its own process (sim/panda_process.py,
as libfranka's C++ loop is outside the daemon's GIL), its gripper, and the cell every sim device shares."""

from __future__ import annotations

import numpy as np

from dataclasses import replace

from edge_steer.franka.arm import Q_START
from edge_steer.franka.gripper import GripperDriver
from edge_steer.realtime import LIBFRANKA_PRIORITY
from edge_steer.runtime.robot import RobotHandle, SimCell
from edge_steer.runtime.robot_process import RemoteCartesianImpedance
from edge_steer.sim.panda import SimGripper
from edge_steer.sim.panda_process import SimPandaProcess
from edge_steer.sim.tasks import get_task


def open_sim(cfg, impedance: np.ndarray, *, enforce_realtime: bool = False, sim_rt_priority: int | None = None,
             motion=None, stage_priority: int = 10, hooks: tuple[str, ...] = ()) -> RobotHandle:
    rt_priority = LIBFRANKA_PRIORITY if sim_rt_priority is None else sim_rt_priority
    task = get_task(cfg.task)
    rng = np.random.default_rng(cfg.seed)
    scene = task.sample_scene(rng, 96)
    q0 = Q_START + rng.uniform(-0.05, 0.05, 7)
    arm = SimPandaProcess(scene.spec, q0, rt_priority=rt_priority, grasp_force=cfg.grasp_force, hooks=hooks,
                          motion=None if motion is None else replace(motion, q_nullspace=q0))
    return RobotHandle(arm, GripperDriver(SimGripper(arm), cfg.grasp_force, asynchronous=True),
                       lambda: RemoteCartesianImpedance(impedance, nullspace_stiffness=cfg.nullspace_stiffness), q0,
                       SimCell(task, scene, arm.world))
