"""Exact cosines between token gradients and their sum, without materialising per-token gradients.

For one linear layer y = W x (+ b) and n tokens with inputs X (n, d_in) and output gradients
Δ (n, d_out), token i's weight gradient is g_i = δ_i x_iᵀ and the summed gradient is G = ΔᵀX
(docs/design.md §3). A bias is a weight column fed a constant 1, so it enters as ‖x_i‖² + 1 and
x_iᵀx_j + 1. A fused gate_up projection is one linear with d_out = 2·intermediate.
"""

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from stgc.moe.grouped import Groups, grouped_matmul, per_expert_sums
from stgc.precision import autocast_off

CosinePath = Literal["auto", "gram", "gemm"]
_PATHS = ("auto", "gram", "gemm")


def _check_linear(
    x: Tensor, delta: Tensor, grad_weight: Tensor | None, grad_bias: Tensor | None, path: str
) -> None:
    """Raise ValueError unless the arguments describe one linear layer seen by the same tokens."""
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
    if x.ndim != 2 or delta.ndim != 2 or x.shape[0] != delta.shape[0]:
        raise ValueError(
            f"inputs {tuple(x.shape)} and output grads {tuple(delta.shape)} must be (n, d_in) and (n, d_out)"
        )
    d_out, d_in = delta.shape[1], x.shape[1]
    if grad_weight is not None and grad_weight.shape != (d_out, d_in):
        raise ValueError(f"grad_weight {tuple(grad_weight.shape)} must be (d_out, d_in) = {(d_out, d_in)}")
    if grad_bias is not None and grad_bias.shape != (d_out,):
        raise ValueError(f"grad_bias {tuple(grad_bias.shape)} must be (d_out,) = {(d_out,)}")


def _uses_gram(n: int, d_in: int, d_out: int, has_grad_weight: bool, path: CosinePath) -> bool:
    """Whether ⟨g_i, G⟩ goes through the Gram path: forced by `path`, else when it takes fewer flops."""
    if path != "auto":
        return path == "gram"
    if has_grad_weight:
        return False  # G is at hand: the GEMM path is one product, X Gᵀ
    return n * (d_in + d_out) < 2 * d_in * d_out  # Gram 2n²(d_in+d_out) vs GEMM 4n·d_in·d_out (ΔᵀX, X Gᵀ)


@torch.no_grad()
def linear_gradient_terms(
    x: Tensor,
    delta: Tensor,
    grad_weight: Tensor | None = None,
    grad_bias: Tensor | None = None,
    has_bias: bool = False,
    path: CosinePath = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """⟨g_i, G⟩ (n,), ‖g_i‖² (n,) and ‖G‖² () of one linear layer; summed over layers they give cosines.

    x (n, d_in) and delta (n, d_out) are the layer's inputs and output gradients for the same tokens.
    grad_weight (d_out, d_in) and grad_bias (d_out,), when the caller already has them, must be
    ΔᵀX and Σ_i δ_i (e.g. from a parameter hook); grad_weight then selects the GEMM path unless
    path="gram". grad_bias implies has_bias. Dtypes as `term_dtypes` says, with autocast off; builds
    no autograd graph, since the cosines only select tokens.
    """
    _check_linear(x, delta, grad_weight, grad_bias, path)
    dot, sqnorm = row_terms(x, delta, grad_weight, grad_bias, has_bias, path)
    return dot, sqnorm, dot.sum()  # Σ_i ⟨g_i, G⟩ = ⟨G, G⟩


@torch.no_grad()
def row_terms(
    x: Tensor,
    delta: Tensor,
    grad_weight: Tensor | None = None,
    grad_bias: Tensor | None = None,
    has_bias: bool = False,
    path: CosinePath = "auto",
    groups: Groups | None = None,
) -> tuple[Tensor, Tensor]:
    """`linear_gradient_terms` without its checks and ‖G‖² (the probes' hooks, which sum ‖G‖² = Σ_i ⟨g_i, G⟩
    once per expert): ⟨g_i, G⟩ (n,) and ‖g_i‖² (n,). With `groups`, x and delta hold every expert's rows
    sorted by expert, grad_weight (E, d_out, d_in) and grad_bias (E, d_out) are per expert: all experts'
    terms in one grouped product."""
    with autocast_off(x):  # the dtypes are chosen here, whatever autocast is doing
        bias = has_bias or grad_bias is not None
        accumulate, product = term_dtypes(x.dtype, delta.dtype)
        x_sqnorm = torch.linalg.vector_norm(x, dim=1, dtype=accumulate).square()  # (n,) no (n, d) temporary
        sqnorm = torch.linalg.vector_norm(delta, dim=1, dtype=accumulate).square() * (
            x_sqnorm + 1 if bias else x_sqnorm
        )
        if x.dtype != product or delta.dtype != product:
            x, delta = x.to(product), delta.to(product)
        if groups is None and _uses_gram(
            x.shape[0], x.shape[1], delta.shape[1], grad_weight is not None, path
        ):
            gram = (delta @ delta.T).to(accumulate) * ((x @ x.T).to(accumulate) + bias)  # (n, n)
            return gram.sum(1), sqnorm  # Σ_j δ_iᵀδ_j (x_iᵀx_j + bias)
        weight = (
            delta.T @ x if grad_weight is None else grad_weight.to(product)
        )  # (d_out, d_in) or (E, ...) G
        rows, times_weight = weight_product(x, delta, weight, groups)
        dot = torch.linalg.vecdot(rows.to(accumulate), times_weight.to(accumulate))  # ⟨g_i, G⟩ (n,)
        if bias:  # + δ_iᵀ Σ_j δ_j (over the expert's rows)
            delta = delta.to(accumulate)
            if groups is None:
                total = delta.sum(0) if grad_bias is None else grad_bias.to(accumulate)
                return dot + delta @ total, sqnorm
            totals = per_expert_sums(delta, groups, len(groups.sizes)) if grad_bias is None else grad_bias
            dot = dot + torch.linalg.vecdot(delta, totals.to(accumulate).index_select(0, groups.row_experts))
        return dot, sqnorm


def weight_product(
    x: Tensor, delta: Tensor, weight: Tensor, groups: Groups | None = None
) -> tuple[Tensor, Tensor]:
    """The one product exact cosines add per linear, on its narrower side, and the rows it pairs with:
    (X, Δ G) (n, d_in) when d_in < d_out, else (Δ, X Gᵀ) (n, d_out), since δ_iᵀ G x_i = (Gᵀ δ_i)ᵀ x_i; their
    row dot products are ⟨g_i, G⟩. weight: G (d_out, d_in), or (E, d_out, d_in) per expert with `groups`."""

    def times(rows: Tensor, matrix: Tensor) -> Tensor:  # each row times G (its expert's)
        return rows @ matrix if groups is None else grouped_matmul(rows, matrix, groups)

    if x.shape[1] < delta.shape[1]:
        return x, times(delta, weight)
    return delta, times(x, weight.mT)


def term_dtypes(x_dtype: torch.dtype, delta_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(accumulation, product) dtypes of the cosine terms. Sums and norms run in float32 (float64 for
    float64 inputs). The large products run in bfloat16 when the expert computed in bfloat16 (as fast
    as its own matmuls; the cosines then agree with float64 to about 1e-3), else in float32: float16's
    range cannot hold products of loss-scaled gradients."""
    inputs = torch.promote_types(x_dtype, delta_dtype)
    accumulate = torch.promote_types(inputs, torch.float32)
    return accumulate, torch.bfloat16 if inputs == torch.bfloat16 else accumulate


def cosine_from_terms(dot: Tensor, sqnorm: Tensor, total_sqnorm: Tensor) -> Tensor:
    """cos_i = ⟨g_i, G⟩ / (‖g_i‖ ‖G‖) (n,); 0.0 where g_i or G is zero, as neither then has a direction.
    total_sqnorm is () or (n,)."""
    norms = sqnorm.sqrt() * total_sqnorm.sqrt()  # (n,)  square roots first: the product may underflow
    return torch.where(norms > 0, dot / norms, 0.0)


def leave_one_out_cosine(dot: Tensor, sqnorm: Tensor, total_sqnorm: Tensor) -> Tensor:
    """cos(g_i, G - g_i) (n,) from the same terms: ⟨g_i, G - g_i⟩ = ⟨g_i, G⟩ - ‖g_i‖² and
    ‖G - g_i‖² = ‖G‖² - 2⟨g_i, G⟩ + ‖g_i‖². Free of the token's own share of the sum, so its null level
    (near-orthogonal gradients) is 0 rather than about 1/√n; 0.0 for a token alone in its expert."""
    others_sqnorm = (total_sqnorm - 2 * dot + sqnorm).clamp(min=0)  # (n,) rounding can dip below 0
    return cosine_from_terms(dot - sqnorm, sqnorm, others_sqnorm)


def token_gradient_cosine(
    inputs: Sequence[Tensor],
    output_grads: Sequence[Tensor],
    has_bias: bool | Sequence[bool] = False,
    path: CosinePath = "auto",
) -> Tensor:
    """Cosine (n,) between each token's gradient over all of one expert's linear layers and their sum.

    inputs[l] (n, d_in_l) and output_grads[l] (n, d_out_l) belong to linear layer l of the expert,
    rows in the same token order; has_bias is one flag for all layers or one per layer.
    """
    if len(inputs) != len(output_grads):
        raise ValueError(f"got {len(inputs)} layer inputs but {len(output_grads)} output grads")
    if not inputs:
        raise ValueError("need at least one linear layer")
    biases = [has_bias] * len(inputs) if isinstance(has_bias, bool) else list(has_bias)
    if len(biases) != len(inputs):
        raise ValueError(f"has_bias has {len(biases)} flags for {len(inputs)} layers")
    terms = []
    for layer, (x, delta, bias) in enumerate(zip(inputs, output_grads, biases, strict=True)):
        if x.shape[:1] != inputs[0].shape[:1]:
            raise ValueError(
                f"layer {layer}: inputs {tuple(x.shape)} hold other tokens than layer 0's {tuple(inputs[0].shape)}"
            )
        try:
            terms.append(linear_gradient_terms(x, delta, has_bias=bias, path=path))
        except ValueError as err:
            raise ValueError(f"layer {layer}: {err}") from err
    dots, sqnorms, totals = zip(*terms, strict=True)
    return cosine_from_terms(sum(dots), sum(sqnorms), sum(totals))
