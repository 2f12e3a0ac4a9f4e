"""Which batches each process reads in an epoch, as a function of (seed, epoch) only.

The order does not depend on the number of processes: process p of N takes positions p, p+N, ... of one
permutation (padded by wrapping so every process runs the same number of steps, as accelerate does). With
gradient accumulation over N micro-batches on one process, a step therefore sees the same images as one step
on N processes, and a resumed run can start at any batch of an epoch.
"""
from __future__ import annotations

import math

import torch

from library.data.datasets import collate_batch


class EpochOrderSampler(torch.utils.data.Sampler):
    """Batch positions of one epoch for one process; `set_epoch(epoch, start)` before each pass."""

    def __init__(self, num_batches: int, seed: int, process_index: int = 0, num_processes: int = 1,
                 shuffle: bool = True):
        self.num_batches, self.seed, self.shuffle = num_batches, seed, shuffle
        self.process_index, self.num_processes = process_index, num_processes
        self.epoch, self.start = 1, 0

    def per_process(self) -> int:
        return math.ceil(self.num_batches / self.num_processes)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def positions(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_batches, generator=generator).tolist()
        else:
            order = list(range(self.num_batches))
        padded = [order[index % self.num_batches] for index in range(self.per_process() * self.num_processes)]
        return padded[self.process_index::self.num_processes]

    def __iter__(self):
        return iter(self.positions()[self.start:])

    def __len__(self) -> int:
        return self.per_process() - self.start


def epoch_data_loader(dataset, sampler: EpochOrderSampler, workers: int, persistent: bool):
    """A DataLoader over pre-built batches in the sampler's order; it never touches torch's global RNG."""
    return torch.utils.data.DataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=collate_batch,
                                       num_workers=workers, persistent_workers=persistent and workers > 0,
                                       generator=torch.Generator().manual_seed(sampler.seed))
