"""The Franka Panda as the runtime and the simulator both see it: the arm's published parameters
(`arm`), twins of panda-py's / libfranka's value types (`types`), the read-only half of `panda_py.Panda`
(`queries`) and the gripper driver (`gripper`). numpy only: the robot's 1 kHz process imports it."""
