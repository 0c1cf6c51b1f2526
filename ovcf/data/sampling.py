"""Training order and augmentation drawn from (seed, epoch, index) alone.

A run then sees the same batches whether it ran straight through or resumed from `last.ckpt`,
whether samples were loaded by workers or in the main process, and whether one process or a DDP
group trained it: each DDP rank takes its share of the same permutation, so the global batch is
the one a single process would have built.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch.utils.data import Sampler


def sample_seed(*key: int) -> int:
    """A 63-bit seed from integers (seed, epoch, index ...): nearby keys give unrelated streams."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def world() -> tuple[int, int]:
    """(rank, world size) of the running process group, or (0, 1) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochSampler(Sampler):
    """A permutation (or, with `weights`, a weighted draw with replacement) fixed by seed and epoch,
    cut to whole global batches of `batch_size`.

    Yields `(index, epoch)` so the dataset can seed each sample's augmentation by both; Lightning
    calls `set_epoch` before every training epoch. The samples that do not fill a last global batch
    are left out of this epoch (the next permutation draws others), unless there are fewer than one
    batch. In a process group, rank r takes every world-th index, so with `batch_size / world` per
    process the union of the ranks' batches is the global batch; Lightning must not shard again
    (`trainer.use_distributed_sampler=false`).
    """

    def __init__(self, n: int, seed: int, batch_size: int, weights: torch.Tensor | None = None):
        self.n, self.seed, self.batch_size, self.weights, self.epoch = n, int(seed), int(batch_size), weights, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _kept(self) -> int:
        size = world()[1]
        kept = self.n // self.batch_size * self.batch_size if self.n >= self.batch_size else self.n
        return kept // size * size

    def __len__(self) -> int:
        return self._kept() // world()[1]

    def __iter__(self):
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch))
        if self.weights is None:
            order = torch.randperm(self.n, generator=gen)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=gen)
        rank, size = world()
        order = order[: self._kept()][rank::size]
        return iter([(int(i), self.epoch) for i in order])


def split_index(item) -> tuple[int, int | None]:
    """(index, epoch) of a dataset key: a plain index (val/test loaders) has no epoch."""
    if isinstance(item, (tuple, list)):
        return int(item[0]), int(item[1])
    return int(item), None


def seed_epoch(epoch: int) -> None:
    """Reseeds the global RNGs (dropout, stochastic depth) from the run's seed and the epoch, so an
    epoch replayed after a resume draws what the uninterrupted run drew."""
    seed = sample_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), epoch, world()[0])
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
