"""RNG states in checkpoints: each rank restores its own, whatever devices the resuming process sees."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stgc.checkpoint import KeepsRNGState, device_rng_state, rng_states, set_rng_states


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_states_round_trip_and_continue_the_same_random_sequence() -> None:
    states = rng_states()
    first = _draws()
    set_rng_states(states)
    assert _draws() == first


def test_a_checkpoint_from_more_devices_than_this_process_sees_resumes() -> None:
    """An earlier version saved every visible device's CUDA state (8 of them); resuming where one
    device is visible takes that device's state, and a per-rank state is taken as it is."""
    eight = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    assert torch.equal(device_rng_state(eight, 0), eight[0])
    assert torch.equal(device_rng_state(eight, 3), eight[3])
    assert torch.equal(device_rng_state(eight[:2], 5), eight[0])  # fewer states than the device index
    assert torch.equal(device_rng_state(eight[6], 0), eight[6])
    states = rng_states() | {"cuda": eight}
    first = _draws()
    set_rng_states(states)  # no IndexError, here without CUDA as on a 1-GPU machine
    assert _draws() == first


def test_a_different_number_of_ranks_warns_and_keeps_the_current_states() -> None:
    module = KeepsRNGState()
    module._trainer = SimpleNamespace(world_size=1, global_rank=0)
    checkpoint = {"rng_states": [rng_states(), rng_states()]}  # written by 2 ranks
    torch.manual_seed(123)
    expected = torch.rand(())
    torch.manual_seed(123)
    with pytest.warns(UserWarning, match="RNG states of 2 ranks, this run has 1"):
        module.on_load_checkpoint(checkpoint)
    assert torch.equal(torch.rand(()), expected)
