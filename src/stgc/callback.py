"""STGC as a Lightning Callback: token-level gradient conflicts inside MoE experts, and the conflict
elimination loss (CEL) that routes conflicting tokens away from the experts they conflict in.

One pass per micro-batch (docs/design.md §2-§4): probes keep X in forward, take Δ and G in backward;
`on_after_backward` turns them into cosines, flags tokens below the threshold, and adds
∂(λ·CEL)/∂W_router — computed from the detached router inputs only — to the routers' `.grad`.
"""

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from stgc.conflict.hf_experts import (
    IMPLEMENTATION,
    HFExpertsProbe,
    is_hf_experts,
    outermost_transformers_models,
    switch_experts,
)
from stgc.conflict.loss import LOSS_TYPES, conflict_elimination_loss
from stgc.conflict.probes import LayerConflicts, LayerProbe, SparseMoEProbe
from stgc.conflict.sharding import add_to_grad, full_weight
from stgc.conflict.statistics import LayerStats, conflict_heatmap, layer_metrics
from stgc.moe import SparseMoE, short_layer_name
from stgc.precision import autocast_off

REFUSED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy)  # FSDP2 (ModelParallelStrategy) is supported


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


class STGC(L.Callback):
    """Solving Token Gradient Conflict (Yang et al., ICLR 2025) for any LightningModule with MoE layers.

    Args:
        threshold: a token conflicts in an expert when cos(g_t, ḡ_e) < threshold (default and
            loss_weight chosen on easy-vqa by scripts/reproduce.py; see the README).
        loss_weight: λ of the CEL; 0 only measures (how a baseline records the same statistics).
        loss_type: "negated_logits" (the paper's) or "unlikelihood".
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
        self.start_step = start_step
        self.every_n_steps = every_n_steps
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.probes: list[LayerProbe] = []
        self._transformers_models: list = []
        self._previous_experts: dict = {}  # what the transformers models used before we switched them
        self._active = False
        # Running statistics, kept in the checkpoint: (layers, experts) counts since the run began.
        self.measured_micro_batches = 0
        self.skipped_nonfinite = 0
        self.conflict_counts: torch.Tensor | None = None
        self.assignment_counts: torch.Tensor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            threshold=self.threshold, loss_weight=self.loss_weight, loss_type=self.loss_type
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
            self._previous_experts = switch_experts(self._transformers_models, IMPLEMENTATION)
        for probe in self.probes:
            probe.start(self._active)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop_capturing()  # a micro-batch whose backward never ran (training_step returned None)

    def _stop_capturing(self) -> None:
        self._active = False
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
        layers = [probe.conflicts() for probe in self.probes]
        conflicting = [c.has_grad & (c.cosine < self.threshold) for c in layers]  # (S,) per layer
        scale = self._loss_scale(trainer)
        cel = [self._cel(p, c, m, scale) for p, c, m in zip(self.probes, layers, conflicting, strict=True)]
        cel_losses, router_grads = [loss for loss, _ in cel], [grad for _, grad in cel if grad is not None]
        finite = torch.stack([c.finite for c in layers] + [g.isfinite().all() for g in router_grads]).all()
        finite, router_grads = self._agree_across_ranks(trainer, finite, router_grads)
        self._stop_capturing()
        if not finite:  # on every rank at once: no rank is left waiting in a collective
            self.skipped_nonfinite += 1
            return
        for probe, router_grad in zip(self.probes, router_grads, strict=False):  # none when λ = 0
            add_to_grad(probe.router_weight, router_grad)
        num_experts = self.conflict_counts.shape[1]
        stats = [
            LayerStats.of(c, m, loss, num_experts)
            for c, m, loss in zip(layers, conflicting, cel_losses, strict=True)
        ]
        self._count(stats)
        step = trainer.global_step
        if (step + 1) % (self.log_every_n_steps or trainer.log_every_n_steps) == 0:
            self._log_scalars(trainer, pl_module, stats)
        if self.histogram_every_n_steps and step % self.histogram_every_n_steps == 0:
            self._log_histograms(trainer, layers, stats)

    def _loss_scale(self, trainer: L.Trainer) -> float:
        """What the LM loss was multiplied by before backward: λ, 1 / accumulation, fp16's loss scale."""
        scale = self.loss_weight / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scale * scaler.get_scale() if scaler is not None and self.loss_weight > 0 else scale

    def _cel(
        self, probe: LayerProbe, conflicts: LayerConflicts, conflicting: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's CEL value and, when λ > 0, its gradient w.r.t. the router weight alone (scaled
        as the LM loss was); 0 and a zero gradient when nothing conflicts."""
        router_input = probe.routing().router_input.detach()  # (N, H)
        with autocast_off(router_input), torch.enable_grad():
            weight = full_weight(probe.router_weight)  # (E, H), gathered under FSDP2
            logits = router_input.float() @ weight.float().T  # (N, E): a tiny product, recomputed router-only
            loss = conflict_elimination_loss(logits, conflicts.rows, conflicts.expert, self.loss_type, conflicting)
            if self.loss_weight == 0:
                return loss.detach(), None
            (grad,) = torch.autograd.grad(loss * scale, weight)
        return loss.detach(), grad

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
    def _count(self, stats: list[LayerStats]) -> None:
        """Add the step's assignments and conflicts to the running (layers, experts) counts."""
        device = stats[0].assignments.device
        self.assignment_counts = self.assignment_counts.to(device)
        self.conflict_counts = self.conflict_counts.to(device)
        self.assignment_counts += torch.stack([s.assignments for s in stats]).long()
        self.conflict_counts += torch.stack([s.conflicts for s in stats]).long()
        self.measured_micro_batches += 1

    def _log_scalars(self, trainer: L.Trainer, pl_module: L.LightningModule, stats: list[LayerStats]) -> None:
        """The metrics of `layer_metrics` per layer and for all layers, global over the ranks: each rank
        flags its own tokens (against its own experts' mean gradients), and the figures come from
        sums added over the ranks."""
        num_experts = self.conflict_counts.shape[1]
        world = trainer.world_size
        summed = self._mean_over_ranks(trainer, torch.stack([s.vector() for s in stats])) * world
        stats = [LayerStats.from_vector(vector, num_experts) for vector in summed]
        metrics: dict[str, torch.Tensor] = {}
        for probe, layer in zip(self.probes, stats, strict=True):
            metrics.update(layer_metrics(probe.name, layer, probe.num_experts, world))
        metrics.update(layer_metrics("all", sum(stats[1:], stats[0]), 0, world * len(stats)))
        metrics["stgc/skipped_nonfinite"] = torch.tensor(float(self.skipped_nonfinite))
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False)

    def _log_histograms(self, trainer: L.Trainer, layers: list[LayerConflicts], stats: list[LayerStats]) -> None:
        """Cosine histograms per layer and a layer × expert heatmap of conflict ratios (TensorBoard, rank 0)."""
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not loggers or trainer.global_rank != 0:
            return
        image = conflict_heatmap([p.name for p in self.probes], stats)
        for logger in loggers:
            for probe, conflicts in zip(self.probes, layers, strict=True):
                cosine = conflicts.cosine[conflicts.has_grad].detach().float().cpu()
                logger.experiment.add_histogram(f"stgc/cosine/{probe.name}", cosine, trainer.global_step)
            logger.experiment.add_image(
                "stgc/conflict_ratio_heatmap", image, trainer.global_step, dataformats="HWC"
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

