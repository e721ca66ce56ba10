"""STGC over several ranks, in one place: the sums and means over the ranks (one all-reduce each),
and FSDP2's sharded parameters (torch's fully_shard: DTensors, each rank holding a shard).

Each rank flags its own tokens against its own experts' mean gradients. Under FSDP2 the CEL's router
gradient is computed against the whole router weight (E, H) — gathered, it is tiny — averaged over
the ranks with the step's other STGC values, and each rank adds its own shard of it to the router's
sharded `.grad`, which FSDP2 has already averaged over the ranks as DDP does.
"""

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(parameter: Tensor) -> bool:
    """Whether `parameter` is split over ranks (an FSDP2 DTensor)."""
    return isinstance(parameter, DTensor)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor (a parameter, or its gradient), differentiable back to it: all-gathered when
    sharded (every rank must call this in the same order), the tensor itself otherwise."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def add_to_grad(parameter: nn.Parameter, grad: Tensor) -> None:
    """Add a gradient of the whole parameter, equal on every rank, to `parameter.grad`: this rank's
    shard of it when the parameter is sharded (no communication)."""
    if is_sharded(parameter):
        grad = distribute_tensor(grad, parameter.device_mesh, parameter.placements, src_data_rank=None)
    if parameter.grad is None:
        parameter.grad = grad
    else:
        parameter.grad.add_(grad)


def world_size() -> int:
    """The number of ranks in torch.distributed's default group (1 when it is not initialised)."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 when it is not initialised)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def sum_over_ranks(values: Tensor) -> Tensor:
    """The sum of `values` over the ranks: one all-reduce that every rank enters (no barrier), in place."""
    if world_size() > 1:
        torch.distributed.all_reduce(values)
    return values


def mean_over_ranks(values: Tensor) -> Tensor:
    """The mean of `values` over the ranks (what DDP does to gradients)."""
    return sum_over_ranks(values) / world_size()
