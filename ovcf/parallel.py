"""Process pools for per-patient work (phantom rendering, DICOM ingest), and the progress bar.

Workers start from a fresh interpreter (forkserver): forking a process whose torch/OpenMP
threads are running can deadlock the child. Each worker keeps to one thread so that N workers
use N cores. The bar is rich's, and also works in CI logs (no TTY) or switched off.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


def track(items: Iterable[T], total: int, description: str, enabled: bool = True) -> Iterator[T]:
    """Yields `items`, drawing a bar with count and elapsed time when `enabled`."""
    if not enabled:
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


def _one_thread() -> None:
    import os

    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


@contextmanager
def worker_pool(num_workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """A pool to share between several `pool_map` calls (workers start once), or None for one worker."""
    if num_workers <= 1:
        yield None
        return
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(num_workers, mp_context=context, initializer=_one_thread) as pool:
        yield pool


def pool_map(
    fn: Callable,
    jobs: Iterable,
    num_workers: int,
    description: str,
    progress: bool = True,
    pool: ProcessPoolExecutor | None = None,
) -> list:
    """`[fn(job) for job in jobs]` in order, on `num_workers` processes (or `pool`) when more than one."""
    jobs = list(jobs)
    if pool is not None:
        return list(track(pool.map(fn, jobs), len(jobs), description, progress))
    if num_workers > 1 and len(jobs) > 1:
        with worker_pool(min(num_workers, len(jobs))) as pool:
            return list(track(pool.map(fn, jobs), len(jobs), description, progress))
    return list(track(map(fn, jobs), len(jobs), description, progress))
