"""Worker processes for sim episodes and the scene seed of each, shared by demo generation
(demos.py) and evaluation (rollout.py)."""

from __future__ import annotations

import multiprocessing
import zlib
from concurrent.futures import ProcessPoolExecutor

import numpy as np


def process_pool(workers: int, initializer=None, initargs=()) -> ProcessPoolExecutor:
    """Worker processes for sim episodes. They are spawned, never forked: a child forked from a
    process that already holds an EGL context hangs when it makes its own renderer."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=initializer, initargs=initargs)


def episode_seed(seed: int, attempt: int, task_name: str) -> int:
    """Distinct, reproducible scene seed for each (run seed, attempt, task): tasks generated with the
    same run seed must not share object layouts."""
    return int(np.random.SeedSequence([seed, attempt, zlib.crc32(task_name.encode())]).generate_state(1)[0])
