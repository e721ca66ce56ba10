"""The oracle arm: the CEL on ground-truth conflicting pairs, through STGC's public selection interface."""

import torch
from torch import Tensor

from stgc.method.probes import LayerConflicts
from stgc.method.selection import Selection, SelectionStep, random_like
from stgc_experiments.planted.truth import GroundTruth


class OracleSelection(Selection):
    """In each layer, as many planted-conflicting pairs as the gradient flags, drawn at random among them
    (all of them when fewer are planted): what a perfect detector at STGC's rate would choose."""

    def __init__(self, truth: GroundTruth) -> None:
        self.truth = truth

    def select(
        self, layers: list[LayerConflicts], flagged: list[Tensor], step: SelectionStep
    ) -> list[Tensor]:
        generator = torch.Generator(flagged[0].device).manual_seed(step.seed)
        chosen, sides = [], self.truth.sides(step.batch)  # (B*T,)
        for conflicts, mask, routing in zip(layers, flagged, step.routings, strict=True):
            _, planted = self.truth.label(sides, conflicts, routing)
            chosen.append(random_like(mask, planted, generator) & planted)
        return chosen
