"""Which (token, expert) assignments the CEL applies to: a small strategy with a public interface.

`GradientSelection` is STGC: the assignments whose gradient conflicts. `RandomSelection` is the study's
control: as many drawn at random (does choosing them by their gradients matter?). A user's own rule —
the planted-conflict benchmark's oracle is one (stgc_experiments.planted) — subclasses `Selection` and is
passed as `STGC(selection=...)`.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from stgc.method.probes import LayerConflicts, LayerRouting

SELECTIONS = ("gradient", "random")  # the names STGC(selection=...) accepts for the built-in rules


@dataclass
class SelectionStep:
    """What a selection may look at besides the conflicts, for one micro-batch on one rank."""

    batch: Any  # the micro-batch as the training step received it
    routings: list[LayerRouting]  # per MoE layer: where it sent its tokens (routing.positions: into B*T)
    seed: int  # for any random draw: a function of the run's seed, the rank and the micro-batch count


class Selection(ABC):
    """Chooses, per MoE layer, the assignments the CEL applies to. Masks on the device: no host sync."""

    @abstractmethod
    def select(
        self, layers: list[LayerConflicts], flagged: list[Tensor], step: SelectionStep
    ) -> list[Tensor]:
        """Per layer an (S,) bool mask over `layers[l]`'s assignments; `flagged[l]` (S,) are those whose
        gradient conflicts (cos < τ, with a gradient)."""


class GradientSelection(Selection):
    """STGC: the CEL applies to the conflicting assignments."""

    def select(
        self, layers: list[LayerConflicts], flagged: list[Tensor], step: SelectionStep
    ) -> list[Tensor]:
        return flagged


class RandomSelection(Selection):
    """The control: in each layer, as many assignments as the gradient flags, drawn uniformly among those
    with a gradient. Seeded per micro-batch and rank: a resumed run draws what it would have drawn, and the
    training's own RNG streams are left as they were."""

    def select(
        self, layers: list[LayerConflicts], flagged: list[Tensor], step: SelectionStep
    ) -> list[Tensor]:
        generator = torch.Generator(flagged[0].device).manual_seed(step.seed)
        return [random_like(m, c.has_grad, generator) for c, m in zip(layers, flagged, strict=True)]


def selection_named(name: str) -> Selection:
    """The built-in rule of a name in SELECTIONS."""
    if name not in SELECTIONS:
        raise ValueError(
            f"selection={name!r} must be one of {SELECTIONS} or a stgc.method.selection.Selection"
        )
    return GradientSelection() if name == "gradient" else RandomSelection()


def random_like(flagged: Tensor, eligible: Tensor, generator: torch.Generator) -> Tensor:
    """(S,) bool: as many assignments as `flagged` holds, drawn uniformly without replacement among the
    `eligible` ones (flagged ⊆ eligible). On the device, no host sync: the count stays a tensor."""
    scores = torch.rand(flagged.shape, generator=generator, device=flagged.device)  # (S,)
    scores = scores.masked_fill(~eligible, 2.0)  # the ineligible ones sort last
    ranks = torch.empty_like(scores, dtype=torch.long)
    ranks.scatter_(0, scores.argsort(), torch.arange(scores.numel(), device=scores.device))
    return ranks < flagged.sum()
