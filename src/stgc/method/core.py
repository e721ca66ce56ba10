"""STGC on any torch model with MoE layers, no training framework needed (docs/design.md §2-§4).

Per micro-batch: `begin` before its forward (the probes keep X in forward, take Δ and G in backward);
`after_backward` once its backward has run: cosines, flags below the threshold, the selection, and
∂(λ·CEL)/∂W_router — from the detached router inputs only — added to the routers' `.grad`, with one
all-reduce and one host sync for the whole step; then the optimizer steps, and on a logging step
`measure_reroutes` says what that step did to routing. stgc.callback.STGC runs it in Lightning,
stgc.integrations.transformers in transformers' Trainer.
"""

import re
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stgc.method import names
from stgc.method.diagnostics import (
    PEARSON_SUMS,
    expert_drift,
    pearson,
    pearson_sums,
    reroute_metrics,
    reroute_sums,
)
from stgc.method.distributed import (
    add_to_grad,
    full_tensor,
    mean_over_ranks,
    rank,
    sum_over_ranks,
    world_size,
)
from stgc.method.flat import repeated
from stgc.method.hf_experts import (
    IMPLEMENTATION,
    HFExpertsProbe,
    ModalitySplit,
    is_hf_experts,
    modality_split_of,
    outermost_transformers_models,
    switch_experts,
)
from stgc.method.llama4 import Llama4Probe, is_llama4_moe
from stgc.method.loss import losses_and_logit_grads
from stgc.method.modality import image_token_ids, modality_of
from stgc.method.probes import GRADIENTS, LayerConflicts, LayerProbe, SparseMoEProbe, all_conflicts
from stgc.method.selection import Selection, SelectionStep, selection_named
from stgc.method.settings import Settings
from stgc.method.statistics import LayerStats, layer_metrics, position_conflict_share
from stgc.method.tracing import traced
from stgc.moe import SparseMoE, short_layer_name
from stgc.precision import autocast_off


def find_moe_probes(module: nn.Module) -> list[LayerProbe]:
    """Probes for every MoE layer in `module`: this project's SparseMoE and transformers' experts. A layer
    with more than one MoE (ERNIE-4.5-VL's text and vision experts) names each by its path in the layer."""
    parents = {child: parent for parent in module.modules() for child in parent.children()}
    splits: dict[nn.Module, ModalitySplit] = {}
    found: list[tuple[str, LayerProbe]] = []
    for name, child in module.named_modules():
        if isinstance(child, SparseMoE):
            found.append((name, SparseMoEProbe(short_layer_name(name), child)))
        elif is_llama4_moe(child):
            found.append((name, Llama4Probe(short_layer_name(name), child)))
        elif is_hf_experts(child):
            split = modality_split_of(parents[child], parents)
            if split is not None:
                block, vision = split
                split = (splits.setdefault(block, ModalitySplit(block)), vision)
            found.append((name, HFExpertsProbe(short_layer_name(name), child, parents[child], split)))
    counts = Counter(probe.name for _, probe in found)
    for name, probe in found:
        if counts[probe.name] > 1:  # "layers.1.mlp.text_moe.experts" -> "layer_1_text_moe"
            inner = re.sub(r"^.*?layers\.\d+\.(mlp\.)?|\.experts$", "", name)
            probe.name = f"{probe.name}_{inner.replace('.', '_')}"
    return [probe for _, probe in found]


@dataclass
class StepResult:
    """What `after_backward` found in one micro-batch on this rank."""

    finite: bool  # every rank's terms and CEL gradients were finite; when not, nothing was added
    layers: list[LayerConflicts]  # per MoE layer
    stats: list[LayerStats]  # per MoE layer, this rank's sums on logging and diagnostics steps, else empty
    # on logging steps the figures over all ranks (stgc.method.names), else {}; NaN where not defined
    # this step, which `host_values` leaves out
    metrics: dict[str, Tensor]


@dataclass
class PendingReroute:
    """A logging step's flagged assignments, kept until the optimizer step has updated the routers."""

    router_inputs: list[Tensor]  # per layer (N, H), detached
    logits: list[Tensor]  # per layer (N, E) before the step
    layers: list[LayerConflicts]
    penalised: list[Tensor]  # per layer (S,): the assignments the CEL applied to


class STGCMethod:
    """Solving Token Gradient Conflict (Yang et al., ICLR 2025) on a torch model's MoE layers.

    Takes the keyword arguments of stgc.method.Settings. Keeps, across steps, the running (layers,
    experts) counts of assignments and conflicts (`state_dict`: a resumed run goes on counting).
    """

    def __init__(self, **settings: Any) -> None:
        self.settings = Settings(**settings)
        selection = self.settings.selection
        self.selector = selection if isinstance(selection, Selection) else selection_named(selection)
        self.probes: list[LayerProbe] = []
        self.capturing = False
        self._transformers_models: list = []
        self._previous_experts: dict = {}  # what the transformers models used before we switched them
        self._batch: Any = None  # the micro-batch being measured, for the selection
        self._diagnostics = False  # whether it captures the diagnostics (begin)
        self._pending: PendingReroute | None = None
        self.measured_micro_batches = 0
        self.skipped_nonfinite = 0
        self.conflict_counts: Tensor | None = None  # (layers, experts)
        self.assignment_counts: Tensor | None = None

    # -- set-up ---------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Probes on `model`'s MoE layers (parameters already sharded, under FSDP2). ValueError when it
        has none, or frozen experts."""
        self.detach()
        self.probes = find_moe_probes(model)
        self.image_token_ids = image_token_ids(model)  # for each routed token's modality
        self._transformers_models = [  # those whose experts the probes need switched while capturing
            m for m in outermost_transformers_models(model) if any(is_hf_experts(c) for c in m.modules())
        ]
        if not self.probes:
            raise ValueError(
                f"STGC found no MoE layer in {type(model).__name__}: it needs stgc.moe.SparseMoE layers "
                "(e.g. stgc.moe.upcycle(model)) or a transformers MoE model whose experts use ExpertsInterface"
            )
        shape = (len(self.probes), max(p.num_experts for p in self.probes))
        for name in ("conflict_counts", "assignment_counts"):
            counts = getattr(self, name)
            if counts is None or counts.shape != shape:
                setattr(self, name, torch.zeros(shape, dtype=torch.long))

    def detach(self) -> None:
        """Stop capturing and remove the probes' hooks."""
        self.end()
        for probe in self.probes:
            probe.remove()
        self.probes = []

    @property
    def layer_names(self) -> list[str]:
        return [probe.name for probe in self.probes]

    # -- one micro-batch ------------------------------------------------------------------------------
    def begin(
        self,
        batch: Any = None,
        diagnostics: bool = False,
        keep_reference: bool = False,
        modality: Tensor | None = None,
    ) -> None:
        """Capture the coming micro-batch's forward and backward. `batch` is what a Selection sees;
        `diagnostics` captures both token gradients (their Pearson correlation); `keep_reference` keeps
        the micro-batch's sums for `conflict_share`; `modality` (B, T) gives each input position's
        (stgc.method.modality), else the batch's `input_ids` and the model's image token ids do.
        Transformers models run our experts meanwhile."""
        self.end()
        self.capturing = True
        self._batch = batch
        if modality is None and self.image_token_ids and isinstance(batch, dict) and "input_ids" in batch:
            modality = modality_of(batch["input_ids"], self.image_token_ids)
        for probe in self.probes:
            probe.position_modality = None if modality is None else modality.reshape(-1)
        self._previous_experts = switch_experts(self._transformers_models, IMPLEMENTATION)
        self._diagnostics = diagnostics
        gradients = GRADIENTS if diagnostics else (self.settings.gradient,)
        for probe in self.probes:
            probe.start(True, gradients, "keep" if keep_reference else "none")

    def end(self) -> None:
        """Stop capturing (a micro-batch whose backward never ran, or after `after_backward`)."""
        if not self.capturing and not self._previous_experts:
            return  # stopped already: the probes are idle
        self.capturing = False
        self._batch = None
        for probe in self.probes:
            probe.start(False)
            probe.position_modality = None
        switch_experts(self._previous_experts)
        self._previous_experts = {}

    @traced("stgc.after_backward")
    def after_backward(
        self, accumulation: int = 1, grad_scale: float = 1.0, logging: bool = False
    ) -> StepResult:
        """Flag, select and add the CEL's router gradients, scaled as the loss was before backward
        (1 / `accumulation` micro-batches, fp16's `grad_scale`); ends the capture. Every rank must call
        it together (one all-reduce: the CEL gradients averaged, the skip decided on all ranks at once).
        On `logging` steps the result holds the step's metrics, and `measure_reroutes` is due after
        the optimizer step."""
        if not self.capturing:
            raise RuntimeError("STGCMethod.after_backward without begin: nothing was captured")
        settings = self.settings
        self._verify_rules()
        layers = all_conflicts(self.probes, settings.gradient, settings.mean)
        conflicting = [c.has_grad & (c.cosine < settings.threshold) for c in layers]  # (S,) per layer
        penalised = self._select(layers, conflicting)
        scale = settings.loss_weight / accumulation
        scale = scale * grad_scale if settings.loss_weight > 0 else scale
        # the steps whose statistics are built, the CEL's value among them
        shown = logging or self._diagnostics
        if settings.loss_weight > 0 or shown:
            cel_losses, logits, router_grads = self._cel(layers, penalised, scale)  # no gradients when λ = 0
        else:  # λ = 0 and nothing shown: the CEL would be computed for no one
            cel_losses, logits, router_grads = [], [], []
        finite = torch.stack([c.finite for c in layers] + [g.isfinite().all() for g in router_grads]).all()
        finite, router_grads = self._agree_across_ranks(finite, router_grads)
        self.end()
        if not finite:  # on every rank at once: no rank is left waiting in a collective
            self.skipped_nonfinite += 1
            return StepResult(False, layers, [], {})
        parameters = [p for probe in self.probes for p in probe.router_parameters()] if router_grads else []
        grad_ratios = self._grad_ratios(parameters, router_grads) if logging else None
        for parameter, router_grad in zip(parameters, router_grads, strict=True):
            add_to_grad(parameter, router_grad)  # this rank's shard of it under FSDP2
        num_experts = self.conflict_counts.shape[1]
        stats = []  # the statistics' sums, on the steps that show them; the others count alone
        if shown:
            vectors = LayerStats.vectors_of_layers(  # (layers, V)
                layers, conflicting, cel_losses, num_experts, settings.mean == "others"
            )
            stats = [LayerStats.from_vector(vector, num_experts) for vector in vectors]  # views
            layer_fields = LayerStats.from_vector(vectors, num_experts)  # (layers, E) and (layers,) views
            tallies = layer_fields.assignments, layer_fields.conflicts
        else:
            tallies = LayerStats.tallies_of_layers(layers, conflicting, num_experts)
        self._count(*tallies)
        metrics = {}
        if logging:
            metrics = self._step_metrics(vectors, grad_ratios)
            router_inputs = [probe.routing().router_input.detach() for probe in self.probes]
            self._pending = PendingReroute(router_inputs, logits, layers, penalised)
        return StepResult(True, layers, stats, metrics)

    def _verify_rules(self) -> None:
        """Until each probe's router rule is accepted: the tokens whose experts it reproduces, counted over
        all ranks (one all-reduce and one host sync, on the first steps only), so that a rule that fails
        stops every rank at once rather than leaving the others waiting in the step's collective."""
        unverified = [probe for probe in self.probes if not probe.rule_verified]  # alike on every rank
        if not unverified:
            return
        counts = sum_over_ranks(torch.stack([probe.rule_counts() for probe in unverified]))  # (U, 2)
        for probe, (agreeing, tokens) in zip(unverified, counts.tolist(), strict=True):
            probe.check_rule(agreeing, tokens)

    def _select(self, layers: list[LayerConflicts], conflicting: list[Tensor]) -> list[Tensor]:
        """The assignments the CEL applies to, as the selection chooses them."""
        # seeded from the run's seed, the rank and the micro-batch count (checkpointed): a resumed run
        # draws what it would have drawn
        seed = (torch.initial_seed() + 1_000_003 * rank() + self.measured_micro_batches) % 2**63
        step = SelectionStep(self._batch, [probe.routing() for probe in self.probes], seed)
        return self.selector.select(layers, conflicting, step)

    def _cel(
        self, layers: list[LayerConflicts], penalised: list[Tensor], scale: float
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per layer the CEL value and the router logits (N, E), detached; when λ > 0 the gradients of
        `scale` · Σ_l CEL_l w.r.t. each layer's router weight (and bias) alone, in router_parameters'
        order: ∂CEL/∂z (the forms' closed form, no autograd graph) times the detached router inputs, zero
        where nothing is flagged. The layers that share a number of experts and a score family compute
        their CEL in one pass."""
        router_inputs, logits, router_parameters, groups = [], [], [], {}
        with torch.no_grad():
            for index, probe in enumerate(self.probes):
                router_input = probe.routing().router_input.detach()  # (N, H)
                with autocast_off(router_input):
                    parameters = [full_tensor(p) for p in probe.router_parameters()]  # gathered under FSDP2
                    logits.append(probe.router_logits(router_input, *parameters))  # (N, E): recomputed, tiny
                router_inputs.append(router_input)
                router_parameters.append(parameters)
                groups.setdefault((probe.num_experts, probe.rule.scores), []).append(index)
        losses: list[Tensor] = [None] * len(self.probes)
        logit_grads: list[Tensor] = [None] * len(self.probes)
        for (_, scores), group in groups.items():
            group_losses, group_grads = losses_and_logit_grads(
                [logits[i] for i in group],
                [layers[i].rows for i in group],
                [layers[i].expert for i in group],
                self.settings.loss_type,
                [penalised[i] for i in group],
                scores,
            )
            for i, loss, grad in zip(group, group_losses.unbind(), group_grads, strict=True):
                losses[i], logit_grads[i] = loss, grad
        if self.settings.loss_weight == 0:
            return losses, logits, []
        grads = []
        for router_input, grad, parameters in zip(router_inputs, logit_grads, router_parameters, strict=True):
            grad = grad * scale  # (N, E) ∂(scale·CEL)/∂z; z = x Wᵀ (+ b)
            grads.append((grad.T @ router_input.float()).to(parameters[0].dtype))  # (E, H)
            if len(parameters) > 1:
                grads.append(grad.sum(0).to(parameters[1].dtype))  # (E,)
        return losses, logits, grads

    @staticmethod
    def _agree_across_ranks(finite: Tensor, router_grads: list[Tensor]) -> tuple[bool, list[Tensor]]:
        """Whether every rank's step was finite, and the router gradients averaged over the ranks (DDP
        averaged the LM's), from one all-reduce that every rank enters."""
        dtype = router_grads[0].dtype if router_grads else torch.float32
        flat = mean_over_ranks(
            torch.cat([finite.to(dtype).reshape(1), *(g.reshape(-1) for g in router_grads)])
        )
        averaged = flat[1:].split([g.numel() for g in router_grads])
        all_finite = bool(flat[0] == 1)  # the step's one host sync
        return all_finite, [a.view_as(g) for a, g in zip(averaged, router_grads, strict=True)]

    # -- statistics -----------------------------------------------------------------------------------
    def _grad_ratios(self, parameters: list[nn.Parameter], router_grads: list[Tensor]) -> Tensor | None:
        """(layers,) ‖CEL router gradient‖ / ‖the rest of the router's gradient‖, all layers at once (None
        when λ = 0)."""
        if not router_grads:
            return None
        device = router_grads[0].device
        counts = [len(probe.router_parameters()) for probe in self.probes]
        layer = repeated(torch.arange(len(self.probes), device=device), counts)  # (parameters,)

        def layer_norms(tensors: list[Tensor]) -> Tensor:  # (layers,) the norm of each layer's tensors
            squares = torch.stack([t.float().norm() for t in tensors]).square()
            return squares.new_zeros(len(self.probes)).index_add_(0, layer, squares).sqrt()

        rest = [
            g.new_zeros(()) if p.grad is None else full_tensor(p.grad)
            for p, g in zip(parameters, router_grads, strict=True)
        ]
        return layer_norms(router_grads) / layer_norms(rest)

    def _count(self, assignments: Tensor, conflicts: Tensor) -> None:
        """Add the micro-batch's (layers, experts) assignments and conflicts to the running counts."""
        self.assignment_counts = self.assignment_counts.to(assignments.device)
        self.conflict_counts = self.conflict_counts.to(conflicts.device)
        self.assignment_counts += assignments.long()
        self.conflict_counts += conflicts.long()
        self.measured_micro_batches += 1

    def _step_metrics(self, vectors: Tensor, grad_ratios: Tensor | None) -> dict[str, Tensor]:
        """The metrics of `layer_metrics` per layer and for all layers, from the layers' sums (layers, V)
        added over the ranks; each layer's expert drift and CEL gradient ratio (the same on every rank);
        the skip count. No host sync: undefined figures are NaN (`host_values` leaves them out)."""
        num_experts = self.conflict_counts.shape[1]
        summed = sum_over_ranks(vectors)  # (layers, V)
        world = world_size()
        layers = self.layer_names
        metrics = layer_metrics(layers, summed, num_experts, [p.num_experts for p in self.probes], world)
        every_layer = summed.sum(0, keepdim=True)  # (1, V) every layer's sums, one operator
        metrics.update(layer_metrics([names.ALL_LAYERS], every_layer, num_experts, [0], world * len(summed)))
        for probe in self.probes:
            drift = expert_drift(probe.expert_weights()).float()
            metrics[names.metric(names.EXPERT_DRIFT, probe.name)] = drift
        if grad_ratios is not None:
            for probe, ratio in zip(self.probes, grad_ratios.unbind(), strict=True):
                metrics[names.metric(names.CEL_GRAD_RATIO, probe.name)] = ratio
        metrics[names.SKIPPED_NONFINITE] = summed.new_full((), float(self.skipped_nonfinite))
        return metrics

    @traced("stgc.reroutes")
    def measure_reroutes(self) -> dict[str, Tensor]:
        """Once the optimizer has stepped after a logging step: of its flagged assignments, the share whose
        expert left the token's top-k under the updated router, and the mean change of p_{t,e} (flagged,
        and the others); one all-reduce, no host sync (NaN: not defined). Empty when no logging step is
        pending."""
        pending, self._pending = self._pending, None
        if pending is None:
            return {}
        groups: dict[tuple, list[int]] = {}  # layers whose routers share a rule, top-k and expert count
        for index, probe in enumerate(self.probes):
            groups.setdefault((probe.rule, probe.top_k, probe.num_experts), []).append(index)
        order, sums = [], []
        for (rule, top_k, _), group in groups.items():
            after = []
            for index in group:
                probe = self.probes[index]
                with torch.no_grad(), autocast_off(probe.router_weight):
                    after.append(probe.router_logits(pending.router_inputs[index]))  # (N, E)
            layers = [pending.layers[index] for index in group]
            sums.append(
                reroute_sums(
                    [pending.logits[index] for index in group],
                    after,
                    [c.rows for c in layers],
                    [c.expert for c in layers],
                    [pending.penalised[index] for index in group],
                    [c.has_grad for c in layers],
                    top_k,
                    rule,
                )
            )
            order += group
        summed = sum_over_ranks(torch.cat(sums))  # (layers, 5), in `order`
        return reroute_metrics([self.probes[index].name for index in order], summed)

    def exact_output_pearson(self, layers: list[LayerConflicts]) -> dict[str, Tensor]:
        """Per layer, the Pearson correlation of the exact and the output cosines over all ranks' pairs, of
        a micro-batch that `begin(diagnostics=True)` captured (every rank calls it); NaN, which `host_values`
        leaves out, where it is not finite (fewer than two pairs, a constant side)."""
        sums = [
            pearson_sums(c.cosines["exact"], c.cosines["output"], c.has_grad)
            if set(GRADIENTS) <= set(c.cosines)
            else torch.zeros(len(PEARSON_SUMS), dtype=torch.float64, device=c.cosine.device)
            for c in layers
        ]
        summed = sum_over_ranks(torch.stack(sums))  # (layers, 6)
        values = pearson(summed).float()  # (layers,)
        values = torch.where(values.isfinite(), values, float("nan"))  # fewer than two pairs: not logged
        return {
            names.metric(names.EXACT_OUTPUT_PEARSON, probe.name): value
            for probe, value in zip(self.probes, values.unbind(), strict=True)
        }

    # -- the conflict picture -------------------------------------------------------------------------
    @property
    def has_reference(self) -> bool:
        """Whether the last micro-batch's sums were kept (`begin(keep_reference=True)`)."""
        return bool(self.probes) and bool(self.probes[0].reference)

    def drop_reference(self) -> None:
        """Release the kept sums (they hold the experts' weight gradients of one micro-batch)."""
        for probe in self.probes:
            probe.drop_reference()

    def conflict_share(
        self,
        loss_of_sample: Callable[[], Tensor],
        length: int | None = None,
        forward_context: Callable[[], AbstractContextManager] = nullcontext,
    ) -> Tensor:
        """(length,) per input position of a fixed sample, the share of the MoE layers in which it conflicts
        with what the kept micro-batch asks of its experts (NaN: not routed). Runs `loss_of_sample` (its
        forward, inside `forward_context`) and a backward to the expert weights only: no `.grad` touched,
        the RNG streams left as they were. Releases the kept sums. `length`: the sample's positions, else
        the last routed position + 1."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        settings = self.settings
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            previous = switch_experts(self._transformers_models, IMPLEMENTATION)
            for probe in self.probes:
                probe.start(True, (settings.gradient,), "use")
            with forward_context():
                loss = loss_of_sample()
            weights = [site.weight for probe in self.probes for site in probe.sites]
            torch.autograd.grad(loss, weights, allow_unused=True)  # the probes' hooks see the gradients
            layers = all_conflicts(self.probes, settings.gradient, settings.mean)
            routings = [probe.routing() for probe in self.probes]
            for probe in self.probes:
                probe.start(False)
            self.drop_reference()
            switch_experts(previous)
        conflicting = [c.has_grad & (c.cosine < settings.threshold) for c in layers]
        positions = [r.positions for r in routings]
        if length is None:
            length = max(
                r.router_input.shape[0] if r.positions is None else int(r.positions.max()) + 1
                for r in routings
            )
        return position_conflict_share(layers, conflicting, positions, length)

    # -- checkpointing --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "measured_micro_batches": self.measured_micro_batches,
            "skipped_nonfinite": self.skipped_nonfinite,
            "conflict_counts": self.conflict_counts.cpu(),
            "assignment_counts": self.assignment_counts.cpu(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.measured_micro_batches = state_dict["measured_micro_batches"]
        self.skipped_nonfinite = state_dict["skipped_nonfinite"]
        self.conflict_counts = state_dict["conflict_counts"]
        self.assignment_counts = state_dict["assignment_counts"]
