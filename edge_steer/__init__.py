"""edge-steer: steer a VLA by its attention heads, export it, and serve it on a robot."""

__version__ = "0.1.0"
