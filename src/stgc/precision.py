"""Explicit precision under autocast: which dtype the experts compute in, and regions kept in fp32.

Under `bf16-mixed` / `16-mixed` autocast casts each matmul's inputs down and autograd saves the
cast copies. The MoE layers cast their expert inputs themselves, so that the tensor STGC captures
is the one autograd keeps (no second, fp32 copy of every MoE layer's input stays alive), and they
run the router and every STGC computation with autocast off, in the dtypes chosen here.
"""

from contextlib import AbstractContextManager

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on `x` in: its autocast dtype when enabled, else x's own."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def to_compute_dtype(x: Tensor) -> Tensor:
    """`x` in the dtype its matmuls run in (a no-op outside autocast)."""
    return x.to(compute_dtype(x))


def autocast_off(x: Tensor) -> AbstractContextManager:
    """A region where autocast leaves `x`'s device alone: ops run in the dtypes they are given."""
    return torch.autocast(x.device.type, enabled=False)
