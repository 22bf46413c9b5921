"""The sim backend of the serve daemon's robot (runtime/robot.py's BACKENDS["sim"]): a sampled scene of
the configured task, the sim twin of the arm (its 1 kHz loop in its own process, or a thread of the
daemon with robot.sim_loop = "thread"), its gripper, and the cell every sim device shares."""

from __future__ import annotations

import numpy as np

from edge_steer.franka.arm import Q_START
from edge_steer.franka.gripper import GripperDriver
from edge_steer.franka.types import RobotError
from edge_steer.realtime import LIBFRANKA_PRIORITY
from edge_steer.runtime.robot import RobotHandle, SimCell
from edge_steer.sim.panda import CartesianImpedance, SimGripper, SimPanda
from edge_steer.sim.tasks import get_task
from edge_steer.sim.world import World


def open_sim(cfg, impedance: np.ndarray, *, enforce_realtime: bool = False, sim_rt_priority: int | None = None,
             motion=None, stage_priority: int = 10, hooks: tuple[str, ...] = ()) -> RobotHandle:
    rt_priority = LIBFRANKA_PRIORITY if sim_rt_priority is None else sim_rt_priority
    task = get_task(cfg.task)
    rng = np.random.default_rng(cfg.seed)
    scene = task.sample_scene(rng, 96)
    q0 = Q_START + rng.uniform(-0.05, 0.05, 7)
    if cfg.sim_loop == "process":
        from dataclasses import replace

        from edge_steer.runtime.robot_process import RemoteCartesianImpedance
        from edge_steer.sim.panda_process import SimPandaProcess
        arm = SimPandaProcess(scene.spec, q0, rt_priority=rt_priority, grasp_force=cfg.grasp_force, hooks=hooks,
                              motion=None if motion is None else replace(motion, q_nullspace=q0))
        world, controller = arm.world, RemoteCartesianImpedance
    else:
        if motion is not None:
            raise RobotError("the setpoint stage runs in the sim robot's process only with robot.sim_loop 'process'")
        world = World(scene.spec)
        world.reset(q0)
        arm, controller = SimPanda(world=world, realtime=True, rt_priority=rt_priority), CartesianImpedance
    return RobotHandle(arm, GripperDriver(SimGripper(arm), cfg.grasp_force, asynchronous=True),
                       lambda: controller(impedance, nullspace_stiffness=cfg.nullspace_stiffness), q0,
                       SimCell(task, scene, world))
