"""STGC under FSDP2 (torch's fully_shard): parameters are DTensors, each rank holding a shard.

The CEL's router gradient is computed against the whole router weight (E, H) — gathered, it is tiny
— averaged over the ranks with the step's other STGC values, and each rank adds its own shard of it
to the router's sharded `.grad`, which FSDP2 has already averaged over the ranks as DDP does.
"""

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
