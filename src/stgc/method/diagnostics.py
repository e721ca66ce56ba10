"""What STGC does to routing, measured on logging steps: whether flagged tokens leave their experts
after the optimizer step, how far experts have drifted apart, the CEL's share of the router gradient,
and how well the cheap "output" cosine follows the exact one (the paper's Appendix A comparison).

Sums that ranks combine by adding are returned as vectors; the ratios are taken once they are added.
"""

import torch
from torch import Tensor

from stgc.method import names
from stgc.method.distributed import full_tensor
from stgc.method.routers import SOFTMAX, RouterRule

REROUTE_SUMS = ("flagged", "rerouted", "flagged_delta_p", "other", "other_delta_p")
PEARSON_SUMS = ("n", "x", "y", "xx", "yy", "xy")


def reroute_sums(
    logits_before: Tensor,
    logits_after: Tensor,
    rows: Tensor,
    experts: Tensor,
    flagged: Tensor,
    valid: Tensor,
    top_k: int,
    rule: RouterRule = SOFTMAX,
) -> Tensor:
    """(5,) float64 sums over one layer's (token, expert) assignments, the router applied to the same
    inputs before and after the optimizer step (logits (N, E)): flagged pairs; of them, those whose
    expert left the token's top-k; their change of p_{t,e}; the other pairs with a gradient; theirs.
    p and the top-k are the router's `rule`'s. rows, experts, flagged, valid: (S,)."""
    p_before = rule.score(logits_before)[rows, experts]  # (S,)
    p_after = rule.score(logits_after)[rows, experts]  # (S,)
    top_after = rule.choose(logits_after, top_k).index_select(0, rows)  # (S, k)
    rerouted = (top_after != experts[:, None]).all(dim=-1)  # (S,)
    delta_p = (p_after - p_before).double()
    flagged, other = flagged.double(), (valid & ~flagged.bool()).double()
    return torch.stack(
        [
            flagged.sum(),
            (flagged * rerouted).sum(),
            (flagged * delta_p).sum(),
            other.sum(),
            (other * delta_p).sum(),
        ]
    )


def reroute_metrics(layer: str, sums: Tensor) -> dict[str, Tensor]:
    """The reroute rate and the mean change of p_{t,e} of flagged and other pairs of one layer, from its
    added sums (the flagged figures only when something was flagged)."""
    flagged, rerouted, flagged_delta_p, other, other_delta_p = sums
    metrics = {}
    if flagged > 0:
        metrics[names.metric(names.REROUTE_RATE, layer)] = (rerouted / flagged).float()
        metrics[names.metric(names.DELTA_P_FLAGGED, layer)] = (flagged_delta_p / flagged).float()
    if other > 0:
        metrics[names.metric(names.DELTA_P_OTHER, layer)] = (other_delta_p / other).float()
    return metrics


@torch.no_grad()
def expert_drift(expert_weights: list[Tensor]) -> Tensor:
    """Mean over experts of ‖θ_e − θ̄‖ / ‖θ̄‖, θ_e an expert's weights flattened and θ̄ their mean over
    the layer's experts, from the experts' fused weights, each (E, ...): 0 right after upcycling (exact
    copies). Offsets from the first expert, in float32: exactly 0 for copies; a weight at a time, so that
    memory holds two float32 copies of one weight of all experts."""
    distance_sq, mean_sq = 0.0, 0.0
    for fused in expert_weights:
        weight = full_tensor(fused).float().flatten(1)  # (E, n), gathered from its shards under FSDP2
        offsets = weight - weight[0]  # (E, n) θ_e − θ_0
        mean_offset = offsets.mean(0)  # (n,) θ̄ − θ_0
        mean_sq = mean_sq + torch.linalg.vector_norm(weight[0] + mean_offset).double().square()
        distance_sq = (
            distance_sq + torch.linalg.vector_norm(offsets.sub_(mean_offset), dim=1).double().square()
        )
    return (distance_sq.sqrt() / mean_sq.sqrt().clamp(min=torch.finfo(torch.float64).tiny)).mean()


def pearson_sums(x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """(6,) float64 sums n, Σx, Σy, Σx², Σy², Σxy over the entries where `mask` holds (and both are finite)."""
    keep = (mask & x.isfinite() & y.isfinite()).double()
    x, y = torch.nan_to_num(x.double()) * keep, torch.nan_to_num(y.double()) * keep
    return torch.stack([keep.sum(), x.sum(), y.sum(), x.square().sum(), y.square().sum(), (x * y).sum()])


def pearson(sums: Tensor) -> Tensor:
    """The Pearson correlation of the pairs the sums came from (NaN when either side is constant)."""
    n, x, y, xx, yy, xy = sums
    covariance = xy - x * y / n
    return covariance / ((xx - x * x / n) * (yy - y * y / n)).sqrt()
