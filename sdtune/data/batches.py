"""The order training sees the data in: a pure function of (seed, epoch), so a
resumed run can pick it up mid-epoch, and each process takes its own share."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class ShuffledBatches(torch.utils.data.Sampler[list[int]]):
    """Batches of indices from a fresh permutation each epoch.

    The epoch's global batch order depends only on ``(seed, epoch)``; process
    ``rank`` of ``world`` takes batches ``rank, rank + world, ...`` (every process
    gets the same count, so they step in lockstep). ``start(epoch, skip)`` picks
    the epoch and how many of this process's batches to leave out; the next
    iteration yields the rest. The trainer calls it, never the DataLoader, so no
    wrapper can move the order behind its back.
    """

    def __init__(self, size: int, batch_size: int, seed: int, drop_last: bool, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed, self.drop_last = size, batch_size, seed, drop_last
        self.rank, self.world = rank, world
        self.epoch, self.skip = 0, 0
        full, rest = divmod(size, batch_size)
        self.global_batches = full if drop_last or not rest else full + 1
        if self.global_batches < world:
            raise ValueError(f"{size} samples make {self.global_batches} batches of {batch_size}: fewer than the {world} processes")

    def start(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.global_batches // self.world

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        for local in range(self.skip, len(self)):
            index = local * self.world + self.rank
            yield order[index * self.batch_size : (index + 1) * self.batch_size]
