"""Which examples go in which micro-batch: a pure function of the seed and the batch index.

Batches hold examples of one bucket (one image size). Because batch k is computed from
(seed, k) alone, a resumed run sees exactly the batches an uninterrupted run would, and each
data-parallel process takes its own share without a sampler's hidden state.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Hashable, Sequence


class BatchSchedule:
    """An endless sequence of micro-batches over epochs, each epoch a fresh shuffle."""

    def __init__(self, bucket_of: Sequence[Hashable], batch_size: int, seed: int):
        self.bucket_of = list(bucket_of)
        self.batch_size = batch_size
        self.seed = seed
        self._epochs: dict[int, list[list[int]]] = {}
        sizes: dict[Hashable, int] = defaultdict(int)
        for bucket in self.bucket_of:
            sizes[bucket] += 1
        # The same every epoch: each bucket's size is fixed, only the order changes.
        self._per_epoch = sum(-(-n // batch_size) for n in sizes.values())

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch`: shuffled, grouped by bucket, the batch order shuffled again."""
        if epoch not in self._epochs:
            rng = random.Random(f"{self.seed}/epoch/{epoch}")
            order = list(range(len(self.bucket_of)))
            rng.shuffle(order)
            groups: dict[Hashable, list[int]] = defaultdict(list)
            for index in order:
                groups[self.bucket_of[index]].append(index)
            batches = [
                members[i : i + self.batch_size]
                for members in groups.values()
                for i in range(0, len(members), self.batch_size)
            ]
            rng.shuffle(batches)
            self._epochs = {epoch: batches}  # keep one epoch: memory stays flat on long runs
        return self._epochs[epoch]

    def batch(self, index: int) -> tuple[int, list[int]]:
        """(epoch, example indices) of global micro-batch `index`."""
        epoch, position = divmod(index, self.batches_per_epoch())
        return epoch, self.epoch_batches(epoch)[position]

    def batches_per_epoch(self) -> int:
        return self._per_epoch
