"""What a planted-conflict run measures at every step, beside the STGC callback it watches: how well each
cosine variant finds the planted pairs, how often planted and other pairs leave their expert once the
optimizer stepped, and whether a flagged pair is flagged again at the token's next visit.

The meter reads the STGC callback's probes after backward, so it must come before STGC in the Trainer's
callbacks (STGC releases the probes' terms in its own on_after_backward). STGC must capture both token
gradients at every step (`histogram_every_n_steps=1`, no TensorBoard logger: nothing is drawn).
"""

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from stgc import STGC
from stgc.method.probes import GRADIENTS, MEANS
from stgc_experiments.planted.truth import GroundTruth

BINS = 400  # cosine histogram over [-1, 1] per variant, for the detection ROC
VARIANTS = tuple(f"{gradient}/{mean}" for gradient in GRADIENTS for mean in MEANS)


class PlantedMeter(L.Callback):
    """Counts, over a stage III fit, what the ground truth says of STGC's cosines and of routing."""

    def __init__(self, truth: GroundTruth, stgc: STGC | None = None, out: str | None = None) -> None:
        """`stgc`: the callback it watches (None: the Trainer's STGC callback); `out`: where the summary is
        written as JSON when the fit ends (None: not written)."""
        self.truth = truth
        self.stgc = stgc
        self.out = out
        # per variant: (2, BINS) cosine histograms of [other, planted] pairs; (4,) planted, flagged, both, pairs
        self.histograms = {variant: torch.zeros(2, BINS, dtype=torch.float64) for variant in VARIANTS}
        self.counts = {variant: torch.zeros(4, dtype=torch.float64) for variant in VARIANTS}
        self.reroutes = torch.zeros(
            4, dtype=torch.float64
        )  # planted, planted rerouted, other, other rerouted
        self.persistence = torch.zeros(2, dtype=torch.float64)  # flagged at the last visit, flagged again
        # Σ‖g_t‖² of the arm's own gradient over planted and other pairs: whose pull dominates the mean
        self.sqnorms = torch.zeros(2, dtype=torch.float64)
        self.curve: list[Tensor] = []  # per step (planted pairs, pairs) of the arm's own variant
        self.last_flag: Tensor | None = None  # (token ids, E) int8: -1 not seen with that expert, else 0/1
        self._batch: Any = None
        self._pending: list[tuple] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.stgc is None:
            found = [callback for callback in trainer.callbacks if isinstance(callback, STGC)]
            if not found:
                raise ValueError("PlantedMeter watches an STGC callback: the Trainer has none")
            self.stgc = found[0]
        if trainer.callbacks.index(self) > trainer.callbacks.index(self.stgc):
            raise ValueError("PlantedMeter must come before STGC in the callbacks: it reads the probes first")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.out is not None and trainer.is_global_zero:
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out).write_text(json.dumps(self.summary()) + "\n")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch

    @torch.no_grad()
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        probes = [probe for probe in self.stgc.method.probes if probe.capturing]
        self._pending = []
        sides = self.truth.sides(self._batch)  # (B*T,): once for every layer and variant
        for probe in probes:
            routing = probe.routing()
            truth = None
            for variant in VARIANTS:
                gradient, mean = variant.split("/")
                conflicts = probe.conflicts(gradient, mean)
                labelled, planted = self.truth.label(sides, conflicts, routing)  # (S,) each
                flagged = labelled & (conflicts.cosine < self.stgc.method.settings.threshold)
                self._count(variant, conflicts.cosine, labelled, planted, flagged)
                if variant == f"{self.stgc.method.settings.gradient}/{self.stgc.method.settings.mean}":
                    truth = (conflicts, labelled, planted, flagged)
            conflicts, labelled, planted, flagged = truth
            if conflicts.sqnorm is not None:
                sqnorm = conflicts.sqnorm.double()
                other = labelled & ~planted
                self.sqnorms += torch.stack([sqnorm[planted].sum(), sqnorm[other].sum()])
            self.curve.append(torch.stack([planted.sum(), labelled.sum()]).double())
            token = self.truth.ids(self._batch, conflicts.rows, routing.positions)  # (S,)
            self._remember_flags(probe.num_experts, token, conflicts.expert, labelled, flagged)
            router_input = routing.router_input.detach()
            self._pending.append((probe, router_input, conflicts, labelled, planted))

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """The optimizer has stepped: which pairs' experts left the token's top-k under the new router."""
        for probe, router_input, conflicts, labelled, planted in self._pending:
            top = probe.rule.choose(probe.router_logits(router_input), probe.top_k)  # (N, k)
            left = (top.index_select(0, conflicts.rows) != conflicts.expert[:, None]).all(-1)  # (S,)
            other = labelled & ~planted
            self.reroutes += torch.stack(
                [planted.sum(), (planted & left).sum(), other.sum(), (other & left).sum()]
            ).double()
        self._pending = []

    def _count(self, variant: str, cosine: Tensor, valid: Tensor, planted: Tensor, flagged: Tensor) -> None:
        bins = ((cosine.double().clamp(-1, 1) + 1) / 2 * BINS).long().clamp(max=BINS - 1)  # (S,)
        self.histograms[variant].index_put_(
            (planted.long()[valid], bins[valid]), torch.ones(()).double(), accumulate=True
        )
        self.counts[variant] += torch.stack(
            [planted.sum(), flagged.sum(), (planted & flagged).sum(), valid.sum()]
        ).double()

    def _remember_flags(
        self, num_experts: int, token: Tensor, expert: Tensor, valid: Tensor, flagged: Tensor
    ) -> None:
        """Of the pairs flagged at the token's last visit to the same expert, the share flagged again."""
        token, expert, flagged = token[valid], expert[valid], flagged[valid]
        size = int(token.max()) + 1 if token.numel() else 0
        if self.last_flag is None or self.last_flag.shape[0] < size:  # grows with the ids seen
            rows = max(size, 1024) if self.last_flag is None else max(size, 2 * self.last_flag.shape[0])
            grown = torch.full((rows, num_experts), -1, dtype=torch.int8)
            if self.last_flag is not None:
                grown[: self.last_flag.shape[0]] = self.last_flag
            self.last_flag = grown
        was_flagged = self.last_flag[token, expert] == 1  # (S_valid,)
        self.persistence += torch.stack([was_flagged.sum(), (was_flagged & flagged).sum()]).double()
        self.last_flag[token, expert] = flagged.to(torch.int8)

    def summary(self) -> dict[str, Any]:
        """The run's figures: per variant ROC-AUC, precision and recall at the threshold; reroute rates
        of planted and other pairs; flag persistence; the planted pairs' share per step; the cosine
        histograms of other and planted pairs (the ROC)."""
        detection = {}
        for variant in VARIANTS:
            planted, flagged, both, pairs = self.counts[variant].tolist()
            detection[variant] = {
                "auc": roc_auc(self.histograms[variant]),
                "precision": both / flagged if flagged else None,
                "recall": both / planted if planted else None,
                "flagged_rate": flagged / pairs if pairs else None,
                "planted_rate": planted / pairs if pairs else None,
            }
        planted, planted_left, other, other_left = self.reroutes.tolist()
        flagged_before, again = self.persistence.tolist()
        own = self.counts[f"{self.stgc.method.settings.gradient}/{self.stgc.method.settings.mean}"]
        planted_pairs, pairs = own[0].item(), own[3].item()
        sqnorm_planted, sqnorm_other = self.sqnorms.tolist()
        curve = torch.stack(self.curve) if self.curve else torch.zeros(0, 2, dtype=torch.float64)
        return {
            "detection": detection,
            "reroute_rate_planted": planted_left / planted if planted else None,
            "reroute_rate_other": other_left / other if other else None,
            "flag_persistence": again / flagged_before if flagged_before else None,
            # mean ‖g_t‖² of planted and other labelled pairs, and the planted pairs' share of Σ‖g_t‖²
            "grad_sqnorm_planted": sqnorm_planted / planted_pairs if planted_pairs else None,
            "grad_sqnorm_other": sqnorm_other / (pairs - planted_pairs) if pairs > planted_pairs else None,
            "grad_mass_planted": sqnorm_planted / (sqnorm_planted + sqnorm_other) if sqnorm_other else None,
            "planted_rate_curve": (curve[:, 0] / curve[:, 1].clamp(min=1)).tolist(),
            "histograms": {variant: h.long().tolist() for variant, h in self.histograms.items()},
        }


def roc_auc(histograms: Tensor) -> float | None:
    """ROC-AUC of "lower cosine ⇒ planted" from (2, bins) histograms of [other, planted] cosines: the
    chance that a planted pair's cosine is below an other pair's, ties (one bin) counted half."""
    other, planted = histograms[0], histograms[1]
    if other.sum() == 0 or planted.sum() == 0:
        return None
    other_above = other.flip(0).cumsum(0).flip(0) - other  # (bins,) other pairs in higher bins
    wins = (planted * other_above).sum() + 0.5 * (planted * other).sum()
    return float(wins / (planted.sum() * other.sum()))
