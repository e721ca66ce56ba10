"""What STGC does to routing, measured on logging steps: whether flagged tokens leave their experts
after the optimizer step, how far experts have drifted apart, the CEL's share of the router gradient,
and how well the cheap "output" cosine follows the exact one (the paper's Appendix A comparison).

Sums that ranks combine by adding are returned as (layers, sums) tensors; the ratios are taken once
they are added, NaN where they are not defined (`statistics.host_values` leaves those out).
"""

import itertools

import torch
from torch import Tensor

from stgc.method import names
from stgc.method.distributed import full_tensor
from stgc.method.flat import repeated
from stgc.method.routers import SOFTMAX, RouterRule
from stgc.method.statistics import share

REROUTE_SUMS = ("flagged", "rerouted", "flagged_delta_p", "other", "other_delta_p")
PEARSON_SUMS = ("n", "x", "y", "xx", "yy", "xy")


def reroute_sums(
    logits_before: list[Tensor],
    logits_after: list[Tensor],
    rows: list[Tensor],
    experts: list[Tensor],
    flagged: list[Tensor],
    valid: list[Tensor],
    top_k: int,
    rule: RouterRule = SOFTMAX,
) -> Tensor:
    """(L, 5) float64 sums over each of L layers' (token, expert) assignments, the router applied to the
    same inputs before and after the optimizer step (logits (N_l, E) per layer): flagged pairs; of them,
    those whose expert left the token's top-k; their change of p_{t,e}; the other pairs with a gradient;
    theirs. p and the top-k are the router's `rule`'s, which the layers share with `top_k` and E: all
    of them in one pass (no operator repeats per layer). rows, experts, flagged, valid: (S_l,) per layer."""
    starts = itertools.accumulate((logits.shape[0] for logits in logits_before[:-1]), initial=0)
    row = torch.cat([layer_rows + start for layer_rows, start in zip(rows, starts, strict=True)])  # (P,)
    expert = torch.cat(experts)  # (P,)
    layer = repeated(torch.arange(len(rows), device=row.device), [r.shape[0] for r in rows])  # (P,)
    logits = torch.stack([torch.cat(logits_before), torch.cat(logits_after)])  # (2, Σ N_l, E)
    scores = rule.score(logits)
    p_before, p_after = scores[:, row, expert]  # (P,) each
    top_after = rule.choose(logits[1], top_k, scores[1]).index_select(0, row)  # (P, k)
    rerouted = (top_after != expert[:, None]).all(dim=-1)  # (P,)
    delta_p = (p_after - p_before).double()
    is_flagged = torch.cat(flagged)
    other = (torch.cat(valid) & ~is_flagged.bool()).double()
    is_flagged = is_flagged.double()
    pairs = torch.stack(  # (P, 5)
        [is_flagged, is_flagged * rerouted, is_flagged * delta_p, other, other * delta_p], dim=1
    )
    return pairs.new_zeros(len(rows), len(REROUTE_SUMS)).index_add_(0, layer, pairs)


def reroute_metrics(layers: list[str], sums: Tensor) -> dict[str, Tensor]:
    """The reroute rate and the mean change of p_{t,e} of flagged and other pairs of each layer, from
    their added sums (L, 5): views, NaN where nothing was flagged (or nothing else had a gradient)."""
    flagged, rerouted, flagged_delta_p, other, other_delta_p = sums.unbind(-1)
    figures = torch.stack(
        [share(rerouted, flagged), share(flagged_delta_p, flagged), share(other_delta_p, other)], dim=1
    ).float()  # (L, 3)
    quantities = (names.REROUTE_RATE, names.DELTA_P_FLAGGED, names.DELTA_P_OTHER)
    return {
        names.metric(quantity, layer): value
        for layer, row in zip(layers, figures.unbind(), strict=True)
        for quantity, value in zip(quantities, row.unbind(), strict=True)
    }


@torch.no_grad()
def expert_drift(expert_weights: list[Tensor]) -> Tensor:
    """Mean over experts of ‖θ_e − θ̄‖ / ‖θ̄‖, θ_e an expert's weights flattened and θ̄ their mean over
    the layer's experts, from the experts' fused weights, each (E, ...): 0 right after upcycling (exact
    copies). Offsets from the first expert, in float32: exactly 0 for copies; a weight at a time, so that
    memory holds two float32 copies of one weight of all experts."""
    distances, mean_norms = [], []  # per weight: (E,) ‖its part of θ_e − θ̄‖, and ‖its part of θ̄‖
    for fused in expert_weights:
        weight = full_tensor(fused).float().flatten(1)  # (E, n), gathered from its shards under FSDP2
        offsets = weight - weight[0]  # (E, n) θ_e − θ_0
        mean_offset = offsets.mean(0)  # (n,) θ̄ − θ_0
        mean_norms.append(torch.linalg.vector_norm(weight[0] + mean_offset))
        distances.append(torch.linalg.vector_norm(offsets.sub_(mean_offset), dim=1))
    distance = torch.linalg.vector_norm(torch.stack(distances).double(), dim=0)  # (E,) over the weights
    mean_norm = torch.linalg.vector_norm(torch.stack(mean_norms).double())
    return (distance / mean_norm.clamp(min=torch.finfo(torch.float64).tiny)).mean()


def pearson_sums(x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """(6,) float64 sums n, Σx, Σy, Σx², Σy², Σxy over the entries where `mask` holds (and both are finite)."""
    keep = (mask & x.isfinite() & y.isfinite()).double()
    x, y = torch.nan_to_num(x.double()) * keep, torch.nan_to_num(y.double()) * keep
    return torch.stack([keep.sum(), x.sum(), y.sum(), x.square().sum(), y.square().sum(), (x * y).sum()])


def pearson(sums: Tensor) -> Tensor:
    """The Pearson correlation of the pairs the sums (..., 6) came from (NaN when either side is
    constant)."""
    n, x, y, xx, yy, xy = sums.unbind(-1)
    covariance = xy - x * y / n
    return covariance / ((xx - x * x / n) * (yy - y * y / n)).sqrt()
