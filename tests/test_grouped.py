"""stgc.moe.grouped: a product over every expert's rows at once equals a loop over the experts."""

import pytest
import torch

from stgc.moe.grouped import Groups, _has_grouped_mm, grouped_matmul


def _groups(sizes: list[int]) -> Groups:
    counts = torch.tensor(sizes)
    return Groups(sizes, counts.cumsum(0).int(), torch.repeat_interleave(torch.arange(len(sizes)), counts))


@pytest.mark.parametrize(
    ("dtype", "k", "n"),
    [
        (torch.float32, 8, 16),
        (torch.float64, 8, 16),
        (torch.float32, 5, 7),
    ],  # grouped; float64, unaligned: a loop
)
@pytest.mark.parametrize("sizes", [[3, 0, 7], [0, 0, 0], [10]])
def test_grouped_matmul_is_each_rows_own_experts_product(dtype, k, n, sizes) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(sum(sizes), k, dtype=dtype, generator=generator)
    weights = torch.randn(len(sizes), k, n, dtype=dtype, generator=generator)
    groups = _groups(sizes)
    got = grouped_matmul(inputs, weights, groups)
    assert got.shape == (sum(sizes), n)
    for row, expert in enumerate(groups.row_experts.tolist()):
        torch.testing.assert_close(got[row], inputs[row] @ weights[expert])


def test_on_a_gpu_only_bfloat16_is_grouped() -> None:
    """torch's CUDA grouped_mm takes bfloat16: float32 and float16 models loop over their experts there."""
    assert not _has_grouped_mm(torch.device("cuda"), torch.float32)
    assert not _has_grouped_mm(torch.device("cuda"), torch.float16)
    assert _has_grouped_mm(torch.device("cpu"), torch.float32)
