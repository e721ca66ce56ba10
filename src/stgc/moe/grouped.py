"""All experts' rows of a MoE layer in one tensor, sorted by expert, and a product over every expert at
once (torch's grouped_mm): one operator per layer where a loop over experts launches one per expert.

Notation: S rows (routed assignments) sorted by expert, E experts.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# the dtypes grouped_mm runs in on each device (torch's CUDA kernel: bfloat16; float16 only with cuBLASLt's
# grouped GEMM, not asked for here); other dtypes (float64, float32 on a GPU) loop over the experts
GROUPED_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16,)}


@dataclass
class Groups:
    """Where each expert's rows are in a tensor of all experts' rows, sorted by expert."""

    sizes: list[int]  # (E,) rows per expert, on the host (the layer's one host sync)
    offsets: Tensor  # (E,) int32 cumulative row counts on the device: grouped_mm's `offs`
    row_experts: Tensor  # (S,) each row's expert


def grouped_matmul(inputs: Tensor, weights: Tensor, groups: Groups) -> Tensor:
    """(S, n): each row of `inputs` (S, k) times its expert's matrix in `weights` (E, k, n)."""
    weights = weights.to(inputs.dtype)
    if _has_grouped_mm(inputs.device, inputs.dtype) and _aligned(inputs) and _aligned(weights):
        return F.grouped_mm(inputs, weights, offs=groups.offsets)
    # unbind, not weights[e]: its backward stacks the experts' gradients once, where indexing adds E full-size ones
    matrices = weights.unbind(0)
    parts = [part @ matrices[e] for e, part in enumerate(inputs.split(groups.sizes)) if part.shape[0]]
    return torch.cat(parts) if parts else inputs.new_zeros(0, weights.shape[-1])


def grouped_linear(inputs: Tensor, weights: Tensor, bias: Tensor | None, groups: Groups) -> Tensor:
    """(S, n): `grouped_matmul` plus each row's expert's bias (E, n), in the product's dtype (as a linear
    layer under autocast)."""
    outputs = grouped_matmul(inputs, weights, groups)
    if bias is not None:
        outputs = outputs + bias.to(outputs.dtype).index_select(0, groups.row_experts)
    return outputs


def per_expert_sums(rows: Tensor, groups: Groups, num_experts: int) -> Tensor:
    """(E, d) the sum of each expert's rows of `rows` (S, d)."""
    return rows.new_zeros(num_experts, rows.shape[1]).index_add_(0, groups.row_experts, rows)


def _has_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether grouped_mm runs in `dtype` there: on the CPU, and on CUDA GPUs from Ampere (sm80) on."""
    if dtype not in GROUPED_DTYPES.get(device.type, ()):
        return False
    return device.type == "cpu" or torch.cuda.get_device_capability(device) >= (8, 0)


def _aligned(tensor: Tensor) -> bool:
    """grouped_mm's layout rule: 16-byte aligned data and strides (e.g. widths a multiple of 4 in float32)."""
    size = tensor.element_size()
    strides = [
        stride
        for stride, extent in zip(tensor.stride(), tensor.shape, strict=True)
        if stride != 1 and extent > 1
    ]
    return tensor.data_ptr() % 16 == 0 and all(stride * size % 16 == 0 for stride in strides)
