"""Length-grouped shuffling (LLaVA's and transformers' `group_by_length`): less padding per batch."""

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """A random order of indices in which each run of `batch_size` holds samples of similar length.

    Each epoch: shuffle, cut into mega-batches of `mega_batch_factor` batches, sort each by length,
    cut into batches, shuffle the full batches and put the short remainder last (so the DataLoader's
    chunks of `batch_size` are exactly these batches). Seeded by seed + epoch (Lightning calls
    set_epoch), so a resumed run sees the same order as an uninterrupted one.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batch_factor: int = 50
    ) -> None:
        if batch_size < 1 or mega_batch_factor < 1:
            raise ValueError(
                f"batch_size={batch_size} and mega_batch_factor={mega_batch_factor} must be >= 1"
            )
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_size = batch_size * mega_batch_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), self.mega_batch_size):
            mega = sorted(order[start : start + self.mega_batch_size], key=self.lengths.__getitem__)
            batches += [mega[i : i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        remainder = [i for b in batches if len(b) < self.batch_size for i in b]
        shuffled = [full[k] for k in torch.randperm(len(full), generator=generator).tolist()]
        return iter([i for batch in shuffled for i in batch] + remainder)
