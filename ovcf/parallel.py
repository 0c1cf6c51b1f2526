"""Process pools for per-patient work (phantom rendering, DICOM ingest), the progress bar, and which
process of a distributed run this is.

Workers start from a fresh interpreter (forkserver): forking a process whose torch/OpenMP
threads are running can deadlock the child. Each worker keeps to one thread so that N workers
use N cores, and ends when the process that started the pool dies (a killed ingest leaves no
worker running). The bar is rich's, and also works in CI logs (no TTY) or switched off; only the
process of rank zero draws it (each DDP process runs the same code).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # Lightning's order (SLURM's last)


def process_rank() -> int:
    """This process's rank in a distributed run, 0 outside one.

    Read when asked, not at import: Lightning sets `rank_zero_only.rank` when a strategy starts (so
    `ddp_spawn` workers know theirs only then); before that, or without Lightning loaded, the
    variables a launcher sets (Lightning's DDP children get `LOCAL_RANK`, SLURM tasks
    `SLURM_PROCID`) say it, as Lightning itself reads them. Looking into `sys.modules` keeps the
    console and the CLI helpers from importing Lightning.
    """
    rank_zero = sys.modules.get("lightning_utilities.core.rank_zero")
    rank = getattr(getattr(rank_zero, "rank_zero_only", None), "rank", None)
    if rank is None:
        rank = next((os.environ[key] for key in RANK_VARIABLES if key in os.environ), 0)
    return int(rank)


def track(items: Iterable[T], total: int, description: str, enabled: bool = True) -> Iterator[T]:
    """Yields `items`, drawing a bar with count and elapsed time when `enabled` (on rank zero only)."""
    if not enabled or process_rank() != 0:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # only to draw

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(owner: int) -> None:
    """Ends this worker when the process that owns the pool, or its own parent, dies.

    A worker busy with a long task would otherwise run on after its run was killed (SIGKILL, the
    OOM killer). The parent of a forkserver worker is the forkserver, which outlives a killed owner
    for as long as its workers run, so the worker watches the owner itself: a daemon thread waits on
    the owner's pidfd (Linux), else polls it and `os.getppid()` every second. On Linux the kernel
    also sends SIGTERM when the parent dies (`PR_SET_PDEATHSIG`).
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    threading.Thread(target=_watch, args=(owner, parent), name="ovcf-owner-watch", daemon=True).start()


def _watch(owner: int, parent: int) -> None:
    """Returns never: exits the process once `owner` has ended or the parent is no longer `parent`."""
    try:
        pidfd = os.pidfd_open(owner)  # readable once the owner has ended, even before it is reaped
    except (AttributeError, OSError):  # not Linux 5.3+, or the owner has already ended
        pidfd = None
    while os.getppid() == parent and not _ended(owner, pidfd):
        pass
    os._exit(1)


def _ended(owner: int, pidfd: int | None) -> bool:
    """Waits up to a second for process `owner` (or its `pidfd`) to end; whether it has."""
    if pidfd is not None:
        return bool(select.select([pidfd], [], [], 1.0)[0])
    time.sleep(1.0)
    try:
        os.kill(owner, 0)
    except (ProcessLookupError, PermissionError):  # PermissionError: another user's process took its pid
        return True
    return False


def _init_worker(owner: int) -> None:
    """Each worker: one thread (N workers use N cores), and no life after the pool's owner."""
    _die_with(owner)
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
    with ProcessPoolExecutor(num_workers, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),)) as pool:
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
