"""Per-expert or per-layer values laid end to end, so that one operator serves all experts or layers."""

import torch
from torch import Tensor


def repeated(ids: Tensor, counts: list[int]) -> Tensor:
    """(Σ counts,) ids[i] repeated counts[i] times: views of ids concatenated, one operator however many
    (ids (len(counts),))."""
    return torch.cat([ids[i].expand(count) for i, count in enumerate(counts)])
