"""Length-grouped shuffling (LLaVA's and transformers' `group_by_length`): less padding per batch."""

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler

PADDING_INDEX = -1  # an index that LlavaDataset turns into nothing: an empty batch


class LengthGroupedSampler(DistributedSampler):
    """A random order of indices in which each run of `batch_size` holds samples of similar length.

    Each epoch: shuffle, cut into mega-batches of `mega_batch_factor` global batches (a batch per
    rank), sort each by length, cut into global batches, shuffle the full ones and put the short
    remainder last. Rank r takes the r-th batch of every global batch, so all ranks step through
    batches of similar length together; the remainder is dealt out round-robin and padded with its
    first samples, so every rank gets the same number of samples (as DistributedSampler does).
    Seeded by seed + epoch (Lightning calls set_epoch): a resumed run sees the same order as an
    uninterrupted one. A DistributedSampler, so Lightning does not wrap it in another.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        mega_batch_factor: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1 or mega_batch_factor < 1:
            raise ValueError(
                f"batch_size={batch_size} and mega_batch_factor={mega_batch_factor} must be >= 1"
            )
        super().__init__(lengths, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.mega_batch_size = batch_size * num_replicas * mega_batch_factor

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        global_batch = self.batch_size * self.num_replicas
        batches = []
        for start in range(0, len(order), self.mega_batch_size):
            mega = sorted(order[start : start + self.mega_batch_size], key=self.lengths.__getitem__)
            batches += [mega[i : i + global_batch] for i in range(0, len(mega), global_batch)]
        full = [b for b in batches if len(b) == global_batch]
        remainder = [i for b in batches if len(b) < global_batch for i in b]
        shuffled = [full[k] for k in torch.randperm(len(full), generator=generator).tolist()]
        mine = [i for batch in shuffled for i in batch[self.rank * self.batch_size :][: self.batch_size]]
        if remainder:
            padded = len(remainder) + -len(remainder) % self.num_replicas  # a multiple of the ranks
            mine += (remainder * self.num_replicas)[:padded][self.rank :: self.num_replicas]
        return iter(mine)


class EvalShardSampler(DistributedSampler):
    """Rank `rank`'s share of an evaluation order: every `num_replicas`-th sample, none repeated, so
    metrics summed over the ranks are exact. A rank left without a sample gets one PADDING_INDEX (an
    empty batch): every rank then runs the evaluation loop and enters its collectives. A
    DistributedSampler, so Lightning does not wrap it in another."""

    def __init__(self, order: Sequence[int], num_replicas: int, rank: int) -> None:
        super().__init__(order, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = list(order)[rank::num_replicas] or [PADDING_INDEX]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
