"""Aspect-ratio buckets: train each image near its own shape instead of a square crop.

A bucket is a (width, height) whose area is at most ``resolution**2`` and as close
to it as the step allows, with both sides multiples of ``step`` (64 by default:
the VAE's 8x times the UNet's 8x downsampling keeps every feature map whole).
Each image goes to the bucket nearest its aspect ratio; a batch holds one
bucket, since its latents must share a size. This is the NovelAI scheme that
kohya's sd-scripts implements; diffusers' ``generate_aspect_ratio_buckets`` takes a
fixed list of ratios rounded to nearest (areas can exceed the budget) and has no
min/max side, so it is not used here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator


def make_buckets(resolution: int, step: int, min_side: int, max_side: int, max_aspect_ratio: float) -> list[tuple[int, int]]:
    """All (width, height) buckets, sorted by aspect ratio (width/height).

    For each short side ``s`` (a multiple of ``step`` from ``min_side``), the long side
    is the largest multiple of ``step`` with ``s * long <= resolution**2``, capped at
    ``max_side``; both orientations are kept. ``resolution x resolution`` is always one.
    """
    if resolution % step:
        raise ValueError(f"resolution {resolution} is not a multiple of the bucket step {step}")
    area = resolution * resolution
    found = {(resolution, resolution)}
    short = math.ceil(min_side / step) * step
    while short <= resolution:
        long = min(area // short // step * step, max_side // step * step)
        if long >= short and long / short <= max_aspect_ratio:
            found |= {(short, long), (long, short)}
        short += step
    return sorted(found, key=lambda wh: (wh[0] / wh[1], wh[0]))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (compared on a log scale,
    so 2:1 and 1:2 are equally far from square); ties go to the larger area."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda wh: (round(abs(math.log(wh[0] / wh[1]) - ratio), 9), -wh[0] * wh[1]))


class BucketBatchSampler:
    """Batches drawn from one bucket at a time, in an order fixed by the seed.

    Each epoch shuffles the items within every bucket, cuts them into batches
    (the last batch of a bucket may be smaller: nothing is dropped), and shuffles
    the batches: a pure function of ``(seed, epoch)``. Process ``rank`` of
    ``world`` takes batches ``rank, rank + world, ...``; when the batches do not
    divide among the processes, the list is topped up with its own first batches,
    so every process gets the same count (they step in lockstep) and nothing is
    dropped: a few batches are seen twice instead. Batch ``k`` of process ``rank``
    is batch ``k * world + rank`` of the epoch's order (``global_index``), which is
    what the trainer keys its per-batch randomness on, so that the same global
    batch order gives the same run on any number of processes.
    ``start(epoch, skip)`` picks the epoch and how many
    of this process's batches to leave out, which is how a resumed run picks up
    mid-epoch; the trainer calls it, so no wrapper can move the order behind its
    back. It yields ``(item, epoch)`` pairs so the dataset can make per-epoch
    choices (tag order) that depend only on the seed, also in workers.
    """

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.buckets, self.max_batch, self.seed = buckets, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.skip = 0, 0
        counts: dict[tuple[int, int], int] = {}
        for bucket in buckets:
            counts[bucket] = counts.get(bucket, 0) + 1
        self.global_batches = sum(math.ceil(n / batch_size) for n in counts.values())
        if self.global_batches < world:
            raise ValueError(f"the data makes {self.global_batches} batches: fewer than the {world} processes")

    def start(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}")
        groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            groups.setdefault(bucket, []).append(index)
        batches = []
        for bucket in sorted(groups):
            members = groups[bucket]
            rng.shuffle(members)
            batches += [members[i : i + self.max_batch] for i in range(0, len(members), self.max_batch)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.batches(self.epoch)
        order += order[: len(self) * self.world - len(order)]  # short processes repeat, never skip
        for batch in order[self.rank :: self.world][self.skip :]:
            yield [(index, self.epoch) for index in batch]

    def __len__(self) -> int:
        return math.ceil(self.global_batches / self.world)

    def global_index(self, batch: int) -> int:
        """Where this process's ``batch``-th batch of an epoch (from 0) is in the epoch's order."""
        return batch * self.world + self.rank
