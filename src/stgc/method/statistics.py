"""STGC's statistics of one MoE layer: sums that ranks and steps combine by adding, and the metrics
logged from them.

Everything is built from masks on the device (no boolean indexing, no host sync); the host sees the
figures only when they are logged.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from stgc.constants import MODALITIES
from stgc.method import names
from stgc.method.flat import repeated
from stgc.method.probes import LayerConflicts
from stgc.moe.layer import expert_counts

PER_EXPERT = ("assignments", "conflicts")  # the (E,) fields of LayerStats


@dataclass
class LayerStats:
    """Sums over one layer's (token, expert) assignments that have a gradient. Per-expert fields are
    (E,), the others 0-d; all float64, so that sums over ranks and steps stay exact counts."""

    assignments: Tensor  # (E,) assignments
    conflicts: Tensor  # (E,) of them conflicting
    cosine: Tensor  # Σ cos(g_t, ḡ_e)
    cosine_sq: Tensor  # Σ cos²
    cosine_null: Tensor  # Σ of the cosine's null level per assignment: ‖g_t‖/√Σ_e‖g_j‖² (0 leaving t out)
    text: Tensor  # assignments of text tokens
    text_conflicts: Tensor
    image: Tensor  # assignments of image tokens
    image_conflicts: Tensor
    cel_loss: Tensor  # the layer's CEL value

    @classmethod
    def vectors_of_layers(
        cls,
        layers: list[LayerConflicts],
        conflicting: list[Tensor],
        cel_losses: list[Tensor],
        num_experts: int,
        leave_one_out: bool = False,
    ) -> Tensor:
        """(L, V) each layer's sums of one micro-batch, its fields end to end in field order (`from_vector`
        reads them back), all layers in one pass (no operator repeats per layer); `conflicting[l]` (S_l,) flags layer l's conflicting assignments with a gradient.

        The null level is what the cosine would be if the expert's token gradients were orthogonal:
        cos(g_t, Σg) = ‖g_t‖ / √(Σ_j ‖g_j‖²), norm-matched — 1/√n_e for equal norms, less on average when
        the norms differ (near-zero losses make them differ) — and 0 when the token is left out of the
        sum (mean="others")."""
        count = len(layers)
        layer, slot, valid, flagged = _assignment_slots(layers, conflicting, num_experts)
        cosine = torch.where(valid > 0, torch.cat([c.cosine for c in layers]).double(), 0.0)  # (P,)
        sqnorm = torch.cat([c.has_grad.float() if c.sqnorm is None else c.sqnorm for c in layers])
        sqnorm = sqnorm.double() * valid  # (P,) ‖g_t‖², or 1 where the norms are taken equal
        unknown = valid.new_full((), -1.0)
        modality = torch.cat(
            [unknown.expand(c.expert.shape[0]) if c.modality is None else c.modality for c in layers]
        )  # (P,) -1 where unknown

        def per_layer(values: Tensor) -> Tensor:  # (L,)
            return expert_counts(layer, count, values)

        def per_expert(values: Tensor) -> Tensor:  # (L * E,)
            return expert_counts(slot, count * num_experts, values)

        by_modality = {}
        for name, value in MODALITIES.items():
            is_modality = (modality == value).double()  # (P,)
            by_modality[name] = per_layer(valid * is_modality)
            by_modality[f"{name}_conflicts"] = per_layer(flagged * is_modality)
        expert_sqnorm = per_expert(sqnorm)  # Σ_j ‖g_j‖² per (layer, expert)
        null = (sqnorm / expert_sqnorm.index_select(0, slot).clamp(min=1e-300)).sqrt()  # (P,)
        assignments, conflicts = _tallies(slot, valid, flagged, count, num_experts)
        sums = dict(
            assignments=assignments,
            conflicts=conflicts,
            cosine=per_layer(cosine),
            cosine_sq=per_layer(cosine.square()),
            cosine_null=torch.zeros_like(valid[:1]).expand(count) if leave_one_out else per_layer(null),
            cel_loss=torch.stack(cel_losses).detach().double(),
            **by_modality,
        )
        return torch.cat(  # (L, V) in field order
            [sums[f.name].reshape(count, -1) for f in dataclasses.fields(cls)], dim=1
        )

    @staticmethod
    def tallies_of_layers(
        layers: list[LayerConflicts], conflicting: list[Tensor], num_experts: int
    ) -> tuple[Tensor, Tensor]:
        """`of_layers`' assignments and conflicts alone, (layers, E) float64 each: what a step that logs
        nothing needs (the running counts), in a few operators."""
        _, slot, valid, flagged = _assignment_slots(layers, conflicting, num_experts)
        return _tallies(slot, valid, flagged, len(layers), num_experts)

    @classmethod
    def from_vector(cls, vector: Tensor, num_experts: int) -> "LayerStats":
        """The sums of one layer from its row of `vectors_of_layers` (V,), or of each row of (L, V) at once:
        fields (L, E) and (L,). Views, no copy."""
        names = [f.name for f in dataclasses.fields(cls)]
        parts = vector.split([num_experts if name in PER_EXPERT else 1 for name in names], dim=-1)
        return cls(**{n: p if n in PER_EXPERT else p[..., 0] for n, p in zip(names, parts, strict=True)})


def _assignment_slots(
    layers: list[LayerConflicts], conflicting: list[Tensor], num_experts: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(P,) over all layers' assignments: each one's layer, its (layer, expert) slot, whether it has a
    gradient and whether it conflicts (float64 0/1)."""
    layer_ids = torch.arange(len(layers), device=layers[0].expert.device)
    layer = repeated(layer_ids, [c.expert.shape[0] for c in layers])  # (P,)
    slot = layer * num_experts + torch.cat([c.expert for c in layers])  # (P,)
    valid = torch.cat([c.has_grad for c in layers]).double()  # (P,)
    return layer, slot, valid, torch.cat(conflicting).double()


def _tallies(
    slot: Tensor, valid: Tensor, flagged: Tensor, count: int, num_experts: int
) -> tuple[Tensor, Tensor]:
    """(layers, E) assignments with a gradient and conflicts, from one index_add of both."""
    both = torch.zeros(count * num_experts, 2, dtype=valid.dtype, device=valid.device)
    both.index_add_(0, slot, torch.stack([valid, flagged], dim=1))  # (L * E, 2)
    return both[:, 0].view(count, num_experts), both[:, 1].view(count, num_experts)


def layer_metrics(
    layers: list[str], sums: Tensor, num_experts: int, shown_experts: list[int], cel_terms: int
) -> dict[str, Tensor]:
    """The names of stgc.method.names for every row of `sums` (L, V), layer `layers[l]`'s sums as
    `LayerStats.vectors_of_layers` lays them out:
    conflict ratio (overall and by modality), the paper's gradient consistency (cosine mean and std)
    beside its null level, the CEL averaged over `cel_terms` terms, and for the first
    `shown_experts[l]` experts each one's load and conflict ratio. All rows in one pass (no operator
    repeats per layer or expert, no host sync): each figure is a view, NaN where it is not defined
    (no assignments, no token of a modality), which `host_values` leaves out."""
    stats = LayerStats.from_vector(sums, num_experts)  # fields (L, E) and (L,)
    tokens = stats.assignments.sum(-1)  # (L,)
    mean = share(stats.cosine, tokens)
    families = {
        names.CEL_LOSS: stats.cel_loss / cel_terms,
        names.CONFLICT_RATIO: share(stats.conflicts.sum(-1), tokens),
        names.COSINE_MEAN: mean,
        names.COSINE_NULL: share(stats.cosine_null, tokens),
        names.COSINE_STD: (share(stats.cosine_sq, tokens) - mean.square()).clamp(min=0).sqrt(),
        **{
            f"{names.CONFLICT_RATIO}_{modality}": share(
                getattr(stats, f"{modality}_conflicts"), getattr(stats, modality)
            )
            for modality in MODALITIES
        },
    }
    rows = torch.stack(list(families.values()), dim=1).float()  # (L, families)
    load = (stats.assignments / tokens.clamp(min=1)[:, None]).float()  # (L, E)
    ratio = (stats.conflicts / stats.assignments.clamp(min=1)).float()  # (L, E)
    metrics = {}
    for layer, values, loads, ratios, shown in zip(
        layers, rows.unbind(), load.unbind(), ratio.unbind(), shown_experts, strict=True
    ):
        metrics.update(
            {
                names.metric(family, layer): value
                for family, value in zip(families, values.unbind(), strict=True)
            }
        )
        for e, (expert_load, expert_ratio) in enumerate(
            zip(loads[:shown].unbind(), ratios[:shown].unbind(), strict=True)
        ):
            metrics[names.metric(names.EXPERT_LOAD, layer, e)] = expert_load
            metrics[names.metric(names.EXPERT_CONFLICT_RATIO, layer, e)] = expert_ratio
    return metrics


def share(part: Tensor, whole: Tensor) -> Tensor:
    """part / whole, NaN where whole is 0: a figure not defined on this step, which `host_values` leaves
    out."""
    return torch.where(whole > 0, part / whole, float("nan"))


def host_values(metrics: dict[str, Tensor]) -> dict[str, float]:
    """The metrics (0-d tensors) as floats, from one device-to-host copy of them all, without those that
    are NaN: not defined on this step (`layer_metrics`)."""
    if not metrics:
        return {}
    values = torch.stack(list(metrics.values())).detach().float().tolist()
    return {name: value for name, value in zip(metrics, values, strict=True) if not math.isnan(value)}


def position_conflict_share(
    layers: list[LayerConflicts], conflicting: list[Tensor], positions: list[Tensor | None], length: int
) -> Tensor:
    """(length,) for each input position, the share of the MoE layers that routed it (with a gradient)
    in which it conflicts in one of its experts; NaN where no layer did. positions[l] maps layer l's
    token rows to positions (None: rows are positions)."""
    device = layers[0].cosine.device
    routed = torch.zeros(length, device=device)
    conflicted = torch.zeros(length, device=device)
    for conflicts, flagged, position in zip(layers, conflicting, positions, strict=True):
        where = conflicts.rows if position is None else position.index_select(0, conflicts.rows)  # (S,)
        layer_routed = torch.zeros(length, device=device).index_add_(0, where, conflicts.has_grad.float())
        layer_conflicted = torch.zeros(length, device=device).index_add_(0, where, flagged.float())
        routed += (layer_routed > 0).float()
        conflicted += (layer_conflicted > 0).float()
    return torch.where(routed > 0, conflicted / routed.clamp(min=1), float("nan"))
