"""The simulated twin of the robot cell: MuJoCo Franka, tasks, expert, SimPanda, SimCamera."""

import os

# MuJoCo binds its GL backend when it is first imported; headless machines need EGL.
os.environ.setdefault("MUJOCO_GL", "egl")
