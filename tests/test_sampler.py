"""LengthGroupedSampler: a seeded permutation whose batches group similar lengths."""

import pytest
import torch

from stgc.data.sampler import LengthGroupedSampler


def padded_fraction(order: list[int], lengths: list[int], batch_size: int) -> float:
    """Share of a padded batch's positions that are padding, over all batches of `order`."""
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths) / padded


def test_permutation_seeded_per_epoch_and_less_padding() -> None:
    lengths = torch.randint(70, 300, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=32, seed=3, mega_batch_factor=4)
    first = list(sampler)
    assert sorted(first) == list(range(1000))
    assert list(sampler) == first, "same seed and epoch, same order"
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(1000)) and second != first
    # the 8 left over after 31 full batches come last, so the loader's chunks are the sampler's batches
    full = [first[i : i + 32] for i in range(0, 992, 32)]
    for batch in full:
        spread = max(lengths[i] for i in batch) - min(lengths[i] for i in batch)
        assert spread < 100, "a slice of a length-sorted mega-batch of 128 (random batches span ~220)"
    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(3)).tolist()
    assert padded_fraction(first, lengths, 32) < 0.5 * padded_fraction(shuffled, lengths, 32)


def test_batches_come_in_random_order_not_sorted() -> None:
    lengths = list(range(640))
    order = list(LengthGroupedSampler(lengths, batch_size=32, seed=0, mega_batch_factor=20))
    batch_max = [max(order[i : i + 32]) for i in range(0, 640, 32)]
    assert batch_max != sorted(batch_max)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_each_epoch_without_overlap_but_for_padding(world_size) -> None:
    """Every sample is on one rank, except the fewer than world_size that pad the ranks to equal
    lengths; at each step the ranks' batches come from one sorted global batch (similar lengths)."""
    lengths = [int(x) for x in torch.randint(1, 500, (103,), generator=torch.Generator().manual_seed(1))]
    ranks = [
        list(LengthGroupedSampler(lengths, 4, seed=3, mega_batch_factor=2, num_replicas=world_size, rank=r))
        for r in range(world_size)
    ]
    assert {len(r) for r in ranks} == {len(LengthGroupedSampler(lengths, 4, num_replicas=world_size))}
    every = [i for r in ranks for i in r]
    assert set(every) == set(range(103)) and len(every) - 103 == -103 % world_size
    first_steps = [sorted(lengths[i] for r in ranks for i in r[4 * s : 4 * s + 4]) for s in range(3)]
    spread = sum(max(step) - min(step) for step in first_steps) / 3
    assert spread < 0.5 * (max(lengths) - min(lengths))


def test_eval_shards_cover_the_order_once_and_an_empty_rank_gets_one_padding_index() -> None:
    from torch.utils.data import DistributedSampler

    from stgc.data.sampler import PADDING_INDEX, EvalShardSampler

    order = [5, 3, 9, 0, 7]
    shards = [list(EvalShardSampler(order, num_replicas=2, rank=r)) for r in range(2)]
    assert shards == [[5, 9, 7], [3, 0]]
    lonely = [list(EvalShardSampler([4], num_replicas=3, rank=r)) for r in range(3)]
    assert lonely == [[4], [PADDING_INDEX], [PADDING_INDEX]]
    assert isinstance(EvalShardSampler(order, 2, 0), DistributedSampler)  # Lightning leaves it unwrapped
