"""Process pools for per-patient work (phantom rendering, DICOM ingest), with a progress bar.

Workers start from a fresh interpreter (forkserver): forking a process whose torch/OpenMP
threads are running can deadlock the child. Each worker keeps to one thread so that N workers
use N cores.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor

from ovcf.progress import track


def _one_thread() -> None:
    import os

    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def pool_map(fn: Callable, jobs: Iterable, num_workers: int, description: str, progress: bool = True) -> list:
    """`[fn(job) for job in jobs]` in order, on `num_workers` processes when more than one."""
    jobs = list(jobs)
    if num_workers > 1 and len(jobs) > 1:
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(min(num_workers, len(jobs)), mp_context=context, initializer=_one_thread) as pool:
            return list(track(pool.map(fn, jobs), len(jobs), description, progress))
    return list(track(map(fn, jobs), len(jobs), description, progress))
