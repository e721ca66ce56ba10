"""STGC's statistics of one MoE layer: sums that ranks and steps combine by adding, and the metrics
logged from them.

Everything is built from masks on the device (no boolean indexing, no host sync); the host sees the
figures only when they are logged.
"""

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from stgc.constants import MODALITIES
from stgc.method import names
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
    def of(
        cls,
        conflicts: LayerConflicts,
        conflicting: Tensor,
        cel_loss: Tensor,
        num_experts: int,
        leave_one_out: bool = False,
    ) -> "LayerStats":
        """The sums of one micro-batch; `conflicting` (S,) flags conflicting assignments with a gradient.

        The null level is what the cosine would be if the expert's token gradients were orthogonal:
        cos(g_t, Σg) = ‖g_t‖ / √(Σ_j ‖g_j‖²), norm-matched — 1/√n_e for equal norms, less on average when
        the norms differ (near-zero losses make them differ) — and 0 when the token is left out of the
        sum (mean="others")."""
        valid = conflicts.has_grad.double()  # (S,)
        flagged = conflicting.double()  # (S,)
        cosine = torch.where(conflicts.has_grad, conflicts.cosine.double(), 0.0)  # (S,)
        by_modality = {}
        for name, value in MODALITIES.items():
            if conflicts.modality is None:
                is_modality = torch.zeros_like(valid)
            else:
                is_modality = (conflicts.modality == value).double()  # (S,)
            by_modality[name] = (valid * is_modality).sum()
            by_modality[f"{name}_conflicts"] = (flagged * is_modality).sum()
        assignments = expert_counts(conflicts.expert, num_experts, valid)  # (E,)
        sqnorm = valid if conflicts.sqnorm is None else conflicts.sqnorm.double() * valid  # (S,)
        expert_sqnorm = expert_counts(conflicts.expert, num_experts, sqnorm)  # (E,) Σ_j ‖g_j‖² per expert
        null = (sqnorm / expert_sqnorm.index_select(0, conflicts.expert).clamp(min=1e-300)).sqrt()  # (S,)
        return cls(
            assignments=assignments,
            conflicts=expert_counts(conflicts.expert, num_experts, flagged),
            cosine=cosine.sum(),
            cosine_sq=cosine.square().sum(),
            cosine_null=torch.zeros_like(cosine.sum()) if leave_one_out else null.sum(),
            cel_loss=cel_loss.detach().double(),
            **by_modality,
        )

    def vector(self) -> Tensor:
        """All fields in one flat float64 vector (field order), for one all-reduce."""
        return torch.cat([getattr(self, f.name).reshape(-1) for f in dataclasses.fields(self)])

    @classmethod
    def from_vector(cls, vector: Tensor, num_experts: int) -> "LayerStats":
        """The inverse of `vector`."""
        names = [f.name for f in dataclasses.fields(cls)]
        parts = vector.split([num_experts if name in PER_EXPERT else 1 for name in names])
        return cls(**{n: p if n in PER_EXPERT else p[0] for n, p in zip(names, parts, strict=True)})

    def __add__(self, other: "LayerStats") -> "LayerStats":
        return LayerStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)}
        )


def layer_metrics(layer: str, stats: LayerStats, num_experts: int, cel_terms: int) -> dict[str, Tensor]:
    """The names of stgc.method.names: conflict ratio (overall and by modality), the paper's gradient
    consistency (cosine mean and std) beside its null level, the CEL averaged over `cel_terms` terms, and
    for the first `num_experts` experts (none when 0) each one's load and conflict ratio."""
    metrics = {names.metric(names.CEL_LOSS, layer): (stats.cel_loss / cel_terms).float()}
    tokens = stats.assignments.sum()
    if tokens > 0:
        mean = stats.cosine / tokens
        metrics[names.metric(names.CONFLICT_RATIO, layer)] = (stats.conflicts.sum() / tokens).float()
        metrics[names.metric(names.COSINE_MEAN, layer)] = mean.float()
        metrics[names.metric(names.COSINE_NULL, layer)] = (stats.cosine_null / tokens).float()
        std = (stats.cosine_sq / tokens - mean**2).clamp(min=0).sqrt()
        metrics[names.metric(names.COSINE_STD, layer)] = std.float()
    for modality in MODALITIES:
        count = getattr(stats, modality)
        if count > 0:
            share = getattr(stats, f"{modality}_conflicts") / count
            metrics[names.metric(f"{names.CONFLICT_RATIO}_{modality}", layer)] = share.float()
    load = stats.assignments / stats.assignments.sum().clamp(min=1)  # (E,)
    ratio = stats.conflicts / stats.assignments.clamp(min=1)  # (E,)
    for e in range(num_experts):
        metrics[names.metric(names.EXPERT_LOAD, layer, e)] = load[e].float()
        metrics[names.metric(names.EXPERT_CONFLICT_RATIO, layer, e)] = ratio[e].float()
    return metrics


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
