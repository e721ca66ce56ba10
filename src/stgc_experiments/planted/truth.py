"""The ground truth the meter and the oracle read: which (token, expert) assignments of a micro-batch are
planted-conflicting (docs/planted.md defines it for both levels).

A ground truth gives each routed token a side (a set of families that agree; -1: a token it says nothing
of) and a stable id (to follow a token across steps). An assignment (t, e) with a gradient is
planted-conflicting when t's side is not the majority side of the labelled assignments on e in the
micro-batch (ties: the lowest side index).
"""

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from stgc.method.probes import LayerConflicts, LayerRouting


class GroundTruth(ABC):
    """Sides and ids of a micro-batch's tokens, at their flat positions (B*T) in the batch."""

    num_sides: int

    @abstractmethod
    def sides(self, batch: Any) -> Tensor:
        """(B*T,) long: each position's side, -1 where the ground truth says nothing."""

    @abstractmethod
    def token_ids(self, batch: Any) -> Tensor:
        """(B*T,) long: an id of each position's token, the same at every visit (>= 0 where labelled)."""

    def label(self, sides: Tensor, conflicts: LayerConflicts, routing: LayerRouting) -> tuple[Tensor, Tensor]:
        """(S,) bool `labelled` (with a gradient and a side) and (S,) bool `planted` (⊆ labelled) of one
        layer's assignments; `sides`: the micro-batch's (B*T,), `self.sides(batch)` computed once for all."""
        side = sides.index_select(0, flat_positions(conflicts.rows, routing.positions))  # (S,)
        labelled = conflicts.has_grad & (side >= 0)
        num_experts = len(routing.expert_rows)
        return labelled, minority(side, conflicts.expert, labelled, num_experts, self.num_sides)

    def ids(self, batch: Any, rows: Tensor, positions: Tensor | None) -> Tensor:
        """(S,) the assignments' token ids."""
        return self.token_ids(batch).index_select(0, flat_positions(rows, positions))


def flat_positions(rows: Tensor, positions: Tensor | None) -> Tensor:
    """(S,) the flat batch positions of the assignments' tokens."""
    return rows if positions is None else positions.index_select(0, rows)


def minority(side: Tensor, expert: Tensor, valid: Tensor, num_experts: int, num_sides: int) -> Tensor:
    """(S,) bool: valid assignments whose side is not the majority side among the valid assignments on
    their expert (ties: the lowest index)."""
    counts = torch.zeros(num_experts, num_sides, device=side.device)  # (E, sides)
    counts.index_put_((expert, side.clamp(min=0)), valid.float(), accumulate=True)
    majority = counts.argmax(dim=1)  # (E,)
    return valid & (side != majority[expert])
