"""Which (token, expert) assignments the CEL applies to: those whose gradient conflicts (STGC), or,
as the study's control, as many drawn at random (does choosing them by their gradients matter?)."""

import torch
from torch import Tensor

SELECTIONS = ("gradient", "random")


def random_like(flagged: Tensor, eligible: Tensor, generator: torch.Generator) -> Tensor:
    """(S,) bool: as many assignments as `flagged` holds, drawn uniformly without replacement among the
    `eligible` ones (flagged ⊆ eligible). On the device, no host sync: the count stays a tensor."""
    scores = torch.rand(flagged.shape, generator=generator, device=flagged.device)  # (S,)
    scores = scores.masked_fill(~eligible, 2.0)  # the ineligible ones sort last
    ranks = torch.empty_like(scores, dtype=torch.long)
    ranks.scatter_(0, scores.argsort(), torch.arange(scores.numel(), device=scores.device))
    return ranks < flagged.sum()
