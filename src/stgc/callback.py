"""STGC as a Lightning Callback: token-level gradient conflicts inside MoE experts, and the conflict
elimination loss (CEL) that routes conflicting tokens away from the experts they conflict in.

One pass per micro-batch (docs/design.md §2-§4): probes keep X in forward, take Δ and G in backward;
`on_after_backward` turns them into cosines, flags tokens below the threshold, and adds
∂(λ·CEL)/∂W_router — computed from the detached router inputs only — to the routers' `.grad`.
On logging steps it also measures what the step did to routing (stgc.method.diagnostics).
"""

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from stgc.method.diagnostics import (
    PEARSON_SUMS,
    expert_drift,
    pearson,
    pearson_sums,
    reroute_metrics,
    reroute_sums,
)
from stgc.method.hf_experts import (
    IMPLEMENTATION,
    HFExpertsProbe,
    is_hf_experts,
    outermost_transformers_models,
    switch_experts,
)
from stgc.method.loss import LOSS_TYPES, conflict_elimination_loss
from stgc.method.probes import GRADIENTS, MEANS, LayerConflicts, LayerProbe, SparseMoEProbe
from stgc.method.selection import Selection, SelectionStep, selection_named
from stgc.method.sharding import add_to_grad, full_tensor
from stgc.method.statistics import LayerStats, conflict_heatmap, layer_metrics, position_conflict_share
from stgc.moe import SparseMoE, short_layer_name
from stgc.precision import autocast_off

REFUSED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy)  # FSDP2 (ModelParallelStrategy) is supported
# what a LightningModule provides for the conflict picture (stgc.module.LVLMModule does)
PICTURE_METHODS = ("conflict_picture_sample", "conflict_picture_loss", "conflict_picture")


def find_moe_probes(module: torch.nn.Module) -> list[LayerProbe]:
    """Probes for every MoE layer in `module`: this project's SparseMoE and transformers' experts."""
    parents = {child: parent for parent in module.modules() for child in parent.children()}
    probes: list[LayerProbe] = []
    for name, child in module.named_modules():
        if isinstance(child, SparseMoE):
            probes.append(SparseMoEProbe(short_layer_name(name), child))
        elif is_hf_experts(child):
            probes.append(HFExpertsProbe(short_layer_name(name), child, parents[child]))
    return probes


@dataclass
class PendingReroute:
    """A logging step's flagged assignments, kept until the optimizer step has updated the routers."""

    step: int
    router_inputs: list[torch.Tensor]  # per layer (N, H), detached
    logits: list[torch.Tensor]  # per layer (N, E) before the step
    layers: list[LayerConflicts]
    penalised: list[torch.Tensor]  # per layer (S,): the assignments the CEL applied to


class STGC(L.Callback):
    """Solving Token Gradient Conflict (Yang et al., ICLR 2025) for any LightningModule with MoE layers.

    Args:
        threshold: a token conflicts in an expert when cos(g_t, ḡ_e) < threshold. The defaults
            (τ, λ, form) are the paper's form at the first study's values; the study of
            scripts/reproduce.py found no setting better than the baseline (see the README's Results).
        loss_weight: λ of the CEL; 0 only measures (how a baseline records the same statistics).
        loss_type: "negated_logits" (the reviewers' reading of the paper's Eq. 8; can raise a second
            choice's score), "negated_logits_per_expert" or "unlikelihood" (both always lower the
            conflicting expert's score); see stgc.method.loss.
        gradient: "exact" (the gradient w.r.t. all of the expert's weights) or "output" (w.r.t. the
            expert's output, routing weight included: the paper's cheaper approximation).
        mean: compare g_t with the sum over "all" the expert's tokens (the paper's ḡ_e, which holds
            g_t itself: null level ≈ 1/√n_e) or over the "others" (leave-one-out: null level 0).
        selection: the CEL applies to the conflicting assignments ("gradient": STGC) or, as a control,
            to as many assignments drawn at random in each layer and micro-batch ("random"), or to what a
            `stgc.method.selection.Selection` of your own chooses; the logged conflict statistics are
            the gradient's either way.
        start_step: first optimizer step at which STGC runs.
        every_n_steps: run on every n-th optimizer step (conflicts cost ~1/3 of the experts' time).
        log_every_n_steps: scalar logging period (default: the trainer's).
        histogram_every_n_steps: period of cosine histograms and the layer × expert heatmap (0: never).
    """

    def __init__(
        self,
        threshold: float = -0.1,
        loss_weight: float = 0.01,
        loss_type: str = "negated_logits",
        gradient: str = "exact",
        mean: str = "all",
        selection: str | Selection = "gradient",
        start_step: int = 0,
        every_n_steps: int = 1,
        log_every_n_steps: int | None = None,
        histogram_every_n_steps: int = 500,
    ) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise MisconfigurationException(f"STGC threshold={threshold} must be a cosine in [-1, 1]")
        if loss_weight < 0:
            raise MisconfigurationException(f"STGC loss_weight={loss_weight} must be >= 0")
        if loss_type not in LOSS_TYPES:
            raise MisconfigurationException(f"STGC loss_type={loss_type!r} must be one of {LOSS_TYPES}")
        if gradient not in GRADIENTS or mean not in MEANS:
            raise MisconfigurationException(
                f"STGC gradient={gradient!r} must be one of {GRADIENTS} and mean={mean!r} one of {MEANS}"
            )
        try:
            selector = selection if isinstance(selection, Selection) else selection_named(selection)
        except ValueError as error:
            raise MisconfigurationException(f"STGC {error}") from error
        if start_step < 0 or every_n_steps < 1:
            raise MisconfigurationException(
                f"STGC start_step={start_step} must be >= 0 and every_n_steps={every_n_steps} >= 1"
            )
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise MisconfigurationException(f"STGC log_every_n_steps={log_every_n_steps} must be >= 1")
        if histogram_every_n_steps < 0:
            raise MisconfigurationException(
                f"STGC histogram_every_n_steps={histogram_every_n_steps} must be >= 0"
            )
        self.threshold = threshold
        self.loss_weight = loss_weight
        self.loss_type = loss_type
        self.gradient = gradient
        self.mean = mean
        self.selection = selection
        self.selector = selector
        self.start_step = start_step
        self.every_n_steps = every_n_steps
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.probes: list[LayerProbe] = []
        self._transformers_models: list = []
        self._previous_experts: dict = {}  # what the transformers models used before we switched them
        self._active = False
        self._batch: Any = None  # the micro-batch being measured, for the selection
        self._pending: PendingReroute | None = None
        # Running statistics, kept in the checkpoint: (layers, experts) counts since the run began.
        self.measured_micro_batches = 0
        self.skipped_nonfinite = 0
        self.conflict_counts: torch.Tensor | None = None
        self.assignment_counts: torch.Tensor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            threshold=self.threshold,
            loss_weight=self.loss_weight,
            loss_type=self.loss_type,
            gradient=self.gradient,
            mean=self.mean,
            selection=self.selection if isinstance(self.selection, str) else type(self.selection).__name__,
        )

    # -- set-up -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, REFUSED_STRATEGIES):
            raise MisconfigurationException(
                f"STGC does not support {type(trainer.strategy).__name__}: it shards the parameters into "
                "flat buffers, so the per-expert weight gradients STGC reads and the router weight's .grad "
                "it adds to are not there. Use DDP or FSDP2 (configs/trainer/ddp.yaml, configs/trainer/fsdp2.yaml)."
            )
        if "16-mixed" == trainer.precision and trainer.precision_plugin.scaler is None:
            raise MisconfigurationException("STGC under precision='16-mixed' needs the plugin's GradScaler")
        if not isinstance(trainer.strategy, ModelParallelStrategy):  # FSDP2 shards in configure_model, later
            self._attach(pl_module)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.strategy, ModelParallelStrategy):  # the parameters are DTensors now
            self._attach(pl_module)

    def _attach(self, pl_module: L.LightningModule) -> None:
        """Probes on the module's MoE layers, and running counts of their shape."""
        self._transformers_models = outermost_transformers_models(pl_module)
        try:
            self.probes = find_moe_probes(pl_module)
        except ValueError as error:
            raise MisconfigurationException(f"STGC: {error}. Set `requires_grad` on the experts.") from error
        if not self.probes:
            raise MisconfigurationException(
                f"STGC found no MoE layer in {type(pl_module).__name__}: it needs stgc.moe.SparseMoE layers "
                "(e.g. stgc.moe.upcycle(model)) or a transformers MoE model whose experts use ExpertsInterface"
            )
        shape = (len(self.probes), max(p.num_experts for p in self.probes))
        for name in ("conflict_counts", "assignment_counts"):
            counts = getattr(self, name)
            if counts is None or counts.shape != shape:
                setattr(self, name, torch.zeros(shape, dtype=torch.long))

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop_capturing()
        for probe in self.probes:
            probe.remove()
        self.probes = []

    # -- one micro-batch ----------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._active = step >= self.start_step and (step - self.start_step) % self.every_n_steps == 0
        if self._active:  # transformers models run our experts implementation only while we capture
            self._batch = batch
            self._previous_experts = switch_experts(self._transformers_models, IMPLEMENTATION)
        histogram = self._histogram_step(step)
        gradients = GRADIENTS if histogram else (self.gradient,)  # both: to compare them
        # the conflict picture compares its fixed sample with this micro-batch's experts
        picture = (
            histogram
            and trainer.global_rank == 0
            and not isinstance(trainer.strategy, ModelParallelStrategy)  # a sharded forward needs every rank
            and all(hasattr(pl_module, m) for m in PICTURE_METHODS)
        )
        for probe in self.probes:
            probe.start(self._active, gradients, "keep" if self._active and picture else "none")

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop_capturing()  # a micro-batch whose backward never ran (training_step returned None)
        pending = self._pending
        if pending is not None and trainer.global_step > pending.step:  # the routers have been updated
            self._pending = None
            self._log_reroutes(trainer, pl_module, pending)

    def _histogram_step(self, step: int) -> bool:
        return bool(self.histogram_every_n_steps) and step % self.histogram_every_n_steps == 0

    def _logging_step(self, trainer: L.Trainer) -> bool:
        return (trainer.global_step + 1) % (self.log_every_n_steps or trainer.log_every_n_steps) == 0

    def _stop_capturing(self) -> None:
        self._active = False
        self._batch = None
        for probe in self.probes:
            probe.start(False)
        switch_experts(self._previous_experts)
        self._previous_experts = {}

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Cosines, conflict masks and the CEL's router gradients of every layer, then one all-reduce
        and one host sync for the whole step (the skip decision), whatever the number of layers."""
        if not self._active:
            return
        layers = [probe.conflicts(self.gradient, self.mean) for probe in self.probes]
        conflicting = [c.has_grad & (c.cosine < self.threshold) for c in layers]  # (S,) per layer
        penalised = self._penalised(trainer, layers, conflicting)
        scale = self._loss_scale(trainer)
        cel = [self._cel(p, c, m, scale) for p, c, m in zip(self.probes, layers, penalised, strict=True)]
        cel_losses = [loss for loss, _, _ in cel]
        router_grads = [grad for _, grads, _ in cel for grad in grads]  # none when λ = 0
        finite = torch.stack([c.finite for c in layers] + [g.isfinite().all() for g in router_grads]).all()
        finite, router_grads = self._agree_across_ranks(trainer, finite, router_grads)
        self._stop_capturing()
        if not finite:  # on every rank at once: no rank is left waiting in a collective
            self.skipped_nonfinite += 1
            return
        logging = self._logging_step(trainer)
        parameters = [p for probe in self.probes for p in probe.router_parameters()] if router_grads else []
        grad_ratios = self._grad_ratios(parameters, router_grads) if logging else None
        for parameter, router_grad in zip(parameters, router_grads, strict=True):
            add_to_grad(parameter, router_grad)  # this rank's shard of it under FSDP2
        num_experts = self.conflict_counts.shape[1]
        stats = [
            LayerStats.of(c, m, loss, num_experts, leave_one_out=self.mean == "others")
            for c, m, loss in zip(layers, conflicting, cel_losses, strict=True)
        ]
        self._count(stats)
        if logging:
            self._log_scalars(trainer, pl_module, stats, grad_ratios)
            router_inputs = [probe.routing().router_input.detach() for probe in self.probes]
            logits = [logits for _, _, logits in cel]
            self._pending = PendingReroute(trainer.global_step, router_inputs, logits, layers, penalised)
        if self._histogram_step(trainer.global_step):
            self._log_histograms(trainer, pl_module, layers, stats)

    def _penalised(
        self, trainer: L.Trainer, layers: list[LayerConflicts], conflicting: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The assignments the CEL applies to, as the selection chooses them."""
        # seeded from the run's seed, the rank and the micro-batch count (checkpointed): a resumed run
        # draws what it would have drawn
        seed = (torch.initial_seed() + 1_000_003 * trainer.global_rank + self.measured_micro_batches) % 2**63
        step = SelectionStep(self._batch, [probe.routing() for probe in self.probes], seed)
        return self.selector.select(layers, conflicting, step)

    def _loss_scale(self, trainer: L.Trainer) -> float:
        """What the LM loss was multiplied by before backward: λ, 1 / accumulation, fp16's loss scale."""
        scale = self.loss_weight / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scale * scaler.get_scale() if scaler is not None and self.loss_weight > 0 else scale

    def _cel(
        self, probe: LayerProbe, conflicts: LayerConflicts, conflicting: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The layer's CEL value; when λ > 0 its gradients w.r.t. the router's weight (and bias) alone,
        scaled as the LM loss was (zero when nothing conflicts); and the router logits (N, E), detached."""
        router_input = probe.routing().router_input.detach()  # (N, H)
        with autocast_off(router_input), torch.enable_grad():
            parameters = [full_tensor(p) for p in probe.router_parameters()]  # gathered under FSDP2
            logits = probe.router_logits(router_input, *parameters)  # (N, E): tiny, recomputed router-only
            loss = conflict_elimination_loss(
                logits, conflicts.rows, conflicts.expert, self.loss_type, conflicting
            )
            if self.loss_weight == 0:
                return loss.detach(), [], logits.detach()
            grads = torch.autograd.grad(loss * scale, parameters)
        return loss.detach(), list(grads), logits.detach()

    def _agree_across_ranks(
        self, trainer: L.Trainer, finite: torch.Tensor, router_grads: list[torch.Tensor]
    ) -> tuple[bool, list[torch.Tensor]]:
        """Whether every rank's step was finite, and the router gradients averaged over the ranks (DDP
        averaged the LM's), from one all-reduce that every rank enters."""
        dtype = router_grads[0].dtype if router_grads else torch.float32
        flat = torch.cat([finite.to(dtype).reshape(1), *(g.reshape(-1) for g in router_grads)])
        flat = self._mean_over_ranks(trainer, flat)
        averaged = flat[1:].split([g.numel() for g in router_grads])
        all_finite = bool(flat[0] == 1)  # the step's one host sync
        return all_finite, [a.view_as(g) for a, g in zip(averaged, router_grads, strict=True)]

    def _mean_over_ranks(self, trainer: L.Trainer, values: torch.Tensor) -> torch.Tensor:
        """The mean of `values` over the ranks: a plain all-reduce (no barrier)."""
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return values
        torch.distributed.all_reduce(values)
        return values / trainer.world_size

    # -- statistics ---------------------------------------------------------------------------------
    def _grad_ratios(self, parameters: list[torch.nn.Parameter], router_grads: list[torch.Tensor]) -> list:
        """Per layer, ‖CEL router gradient‖ / ‖the rest of the router's gradient‖ (None when λ = 0)."""
        if not router_grads:
            return [None] * len(self.probes)
        ratios, start = [], 0
        for probe in self.probes:
            count = len(probe.router_parameters())
            cel = torch.stack([g.float().norm() for g in router_grads[start : start + count]]).norm()
            rest = [
                full_tensor(p.grad).float().norm()
                for p in parameters[start : start + count]
                if p.grad is not None
            ]
            rest_norm = torch.stack(rest).norm() if rest else torch.zeros_like(cel)
            ratios.append(cel / rest_norm)
            start += count
        return ratios

    def _count(self, stats: list[LayerStats]) -> None:
        """Add the step's assignments and conflicts to the running (layers, experts) counts."""
        device = stats[0].assignments.device
        self.assignment_counts = self.assignment_counts.to(device)
        self.conflict_counts = self.conflict_counts.to(device)
        self.assignment_counts += torch.stack([s.assignments for s in stats]).long()
        self.conflict_counts += torch.stack([s.conflicts for s in stats]).long()
        self.measured_micro_batches += 1

    def _log_scalars(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stats: list[LayerStats], grad_ratios: list
    ) -> None:
        """The metrics of `layer_metrics` per layer and for all layers, global over the ranks: each rank
        flags its own tokens (against its own experts' mean gradients), and the figures come from
        sums added over the ranks. Plus each layer's expert drift and CEL gradient ratio (the same on
        every rank)."""
        num_experts = self.conflict_counts.shape[1]
        world = trainer.world_size
        summed = self._mean_over_ranks(trainer, torch.stack([s.vector() for s in stats])) * world
        stats = [LayerStats.from_vector(vector, num_experts) for vector in summed]
        metrics: dict[str, torch.Tensor] = {}
        for probe, layer, ratio in zip(self.probes, stats, grad_ratios, strict=True):
            metrics.update(layer_metrics(probe.name, layer, probe.num_experts, world))
            metrics[f"stgc/expert_drift/{probe.name}"] = expert_drift(probe.expert_weights()).float()
            if ratio is not None:
                metrics[f"stgc/cel_grad_ratio/{probe.name}"] = ratio
        metrics.update(layer_metrics("all", sum(stats[1:], stats[0]), 0, world * len(stats)))
        metrics["stgc/skipped_nonfinite"] = torch.tensor(float(self.skipped_nonfinite))
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False)

    def _log_reroutes(
        self, trainer: L.Trainer, pl_module: L.LightningModule, pending: PendingReroute
    ) -> None:
        """Of a logging step's flagged assignments, the share whose expert left the token's top-k under
        the updated router, and the mean change of p_{t,e} (flagged, and the others); one all-reduce."""
        sums = []
        for probe, router_input, before, conflicts, flagged in zip(
            self.probes,
            pending.router_inputs,
            pending.logits,
            pending.layers,
            pending.penalised,
            strict=True,
        ):
            with torch.no_grad(), autocast_off(probe.router_weight):
                after = probe.router_logits(router_input)  # (N, E)
            sums.append(
                reroute_sums(
                    before, after, conflicts.rows, conflicts.expert, flagged, conflicts.has_grad, probe.top_k
                )
            )
        summed = self._mean_over_ranks(trainer, torch.stack(sums)) * trainer.world_size  # (layers, 5)
        for probe, layer_sums in zip(self.probes, summed, strict=True):
            for name, value in reroute_metrics(probe.name, layer_sums).items():
                pl_module.log(name, value, on_step=True, on_epoch=False)

    def _log_histograms(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        layers: list[LayerConflicts],
        stats: list[LayerStats],
    ) -> None:
        """The exact-vs-output Pearson correlation per layer (all ranks' pairs); on rank 0, cosine
        histograms per layer and a layer × expert heatmap of conflict ratios (TensorBoard)."""
        sums = [
            pearson_sums(c.cosines["exact"], c.cosines["output"], c.has_grad)
            if set(GRADIENTS) <= set(c.cosines)
            else torch.zeros(len(PEARSON_SUMS), dtype=torch.float64, device=c.cosine.device)
            for c in layers
        ]
        summed = self._mean_over_ranks(trainer, torch.stack(sums)) * trainer.world_size  # (layers, 6)
        for probe, layer_sums in zip(self.probes, summed, strict=True):
            pearson_value = pearson(layer_sums).float()  # NaN with fewer than two pairs: not logged
            if pearson_value.isfinite():
                pl_module.log(
                    f"stgc/exact_output_pearson/{probe.name}", pearson_value, on_step=True, on_epoch=False
                )
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not loggers or trainer.global_rank != 0:
            return
        image = conflict_heatmap([p.name for p in self.probes], stats)
        picture = self._conflict_picture(trainer, pl_module)
        for logger in loggers:
            for probe, conflicts in zip(self.probes, layers, strict=True):
                cosine = conflicts.cosine[conflicts.has_grad].detach().float().cpu()
                logger.experiment.add_histogram(f"stgc/cosine/{probe.name}", cosine, trainer.global_step)
            logger.experiment.add_image(
                "stgc/conflict_ratio_heatmap", image, trainer.global_step, dataformats="HWC"
            )
            if picture is not None:
                logger.experiment.add_image(
                    "stgc/conflict_picture", picture, trainer.global_step, dataformats="HWC"
                )

    def _conflict_picture(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        """Where a fixed sample's tokens conflict with what this micro-batch asks of each expert, drawn
        by the module (LVLMModule draws its image's patches and its text): the sample's own forward and
        a backward to the expert weights only (no `.grad` touched, the RNG streams left as they were),
        its token gradients compared with the micro-batch's kept sums (LayerProbe.start)."""
        if not self.probes[0].reference:  # nothing kept this step: no picture (rank > 0, FSDP2, no methods)
            return None
        sample = pl_module.conflict_picture_sample()
        if sample is None:
            for probe in self.probes:
                probe.drop_reference()
            return None
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            previous = switch_experts(self._transformers_models, IMPLEMENTATION)
            for probe in self.probes:
                probe.start(True, (self.gradient,), "use")
            with trainer.precision_plugin.forward_context():
                loss = pl_module.conflict_picture_loss(sample)
            weights = [site.weight for probe in self.probes for site in probe.sites]
            torch.autograd.grad(loss, weights, allow_unused=True)  # the probes' hooks see the gradients
            layers = [probe.conflicts(self.gradient, self.mean) for probe in self.probes]
            routings = [probe.routing() for probe in self.probes]
            for probe in self.probes:
                probe.start(False)
                probe.drop_reference()
            switch_experts(previous)
        conflicting = [c.has_grad & (c.cosine < self.threshold) for c in layers]
        positions = [r.positions for r in routings]
        length = self._sample_length(sample, routings)
        share = position_conflict_share(layers, conflicting, positions, length)
        return pl_module.conflict_picture(sample, share)

    @staticmethod
    def _sample_length(sample: Any, routings: list) -> int:
        """Positions of the one-sample batch: its `input_ids`' length, else the last routed position + 1."""
        if isinstance(sample, dict) and "input_ids" in sample:
            return sample["input_ids"].numel()
        return max(
            r.router_input.shape[0] if r.positions is None else int(r.positions.max()) + 1 for r in routings
        )

    # -- checkpointing ------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "measured_micro_batches": self.measured_micro_batches,
            "skipped_nonfinite": self.skipped_nonfinite,
            "conflict_counts": self.conflict_counts.cpu(),
            "assignment_counts": self.assignment_counts.cpu(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.measured_micro_batches = state_dict["measured_micro_batches"]
        self.skipped_nonfinite = state_dict["skipped_nonfinite"]
        self.conflict_counts = state_dict["conflict_counts"]
        self.assignment_counts = state_dict["assignment_counts"]
