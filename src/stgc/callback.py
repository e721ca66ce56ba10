"""STGC as a Lightning Callback: token-level gradient conflicts inside MoE experts, and the conflict
elimination loss (CEL) that routes conflicting tokens away from the experts they conflict in.

One pass per micro-batch (DESIGN.md §2-§4): probes keep X in forward, take Δ and G in backward;
`on_after_backward` turns them into cosines, flags tokens below the threshold, and adds
∂(λ·CEL)/∂W_router — computed from the detached router inputs only — to the routers' `.grad`.
"""

import io
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from PIL import Image
from typing_extensions import override

from stgc.conflict.hf_experts import HFExpertsProbe, is_hf_experts, restore_experts, use_stgc_experts
from stgc.conflict.loss import LOSS_TYPES, conflict_elimination_loss
from stgc.conflict.probes import LayerConflicts, LayerProbe, SparseMoEProbe
from stgc.moe import SparseMoE, short_layer_name

SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


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
        self._previous_experts: dict = {}
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
        if isinstance(trainer.strategy, SHARDED_STRATEGIES):
            raise MisconfigurationException(
                f"STGC does not support {type(trainer.strategy).__name__}: it shards the parameters into "
                "flat buffers, so the per-expert weight gradients STGC reads and the router weight's .grad "
                "it adds to are not there. Use DDP (configs/trainer/ddp.yaml)."
            )
        if "16-mixed" == trainer.precision and trainer.precision_plugin.scaler is None:
            raise MisconfigurationException("STGC under precision='16-mixed' needs the plugin's GradScaler")
        self._previous_experts = use_stgc_experts(pl_module)
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
        for probe in self.probes:
            probe.remove()
        self.probes = []
        restore_experts(self._previous_experts)
        self._previous_experts = {}

    # -- one micro-batch ----------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._active = step >= self.start_step and (step - self.start_step) % self.every_n_steps == 0
        for probe in self.probes:
            probe.start(self._active)

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        layers = [probe.conflicts() for probe in self.probes]
        finite = bool(torch.stack([c.finite.cpu() for c in layers]).all())
        cel_losses = []
        conflicting_masks = [c.has_grad & (c.cosine < self.threshold) for c in layers]  # (S,) per layer
        for probe, conflicts, conflicting in zip(self.probes, layers, conflicting_masks, strict=True):
            cel_loss, router_grad = self._cel_gradient(probe, conflicts, conflicting, trainer, finite)
            if self.loss_weight > 0:
                router_grad = self._average_across_processes(trainer, router_grad)
                weight = probe.router_weight
                weight.grad = router_grad if weight.grad is None else weight.grad.add_(router_grad)
            cel_losses.append(cel_loss)
            probe.start(False)
        if not finite:
            self.skipped_nonfinite += 1
            return
        self.measured_micro_batches += 1
        self._update_counts(layers, conflicting_masks)
        step = trainer.global_step
        if (step + 1) % (self.log_every_n_steps or trainer.log_every_n_steps) == 0:
            self._log_scalars(trainer, pl_module, layers, cel_losses)
        if self.histogram_every_n_steps and step % self.histogram_every_n_steps == 0:
            self._log_histograms(trainer, layers)

    def _average_across_processes(self, trainer: L.Trainer, router_grad: torch.Tensor) -> torch.Tensor:
        """DDP averaged the LM gradients before this hook; average ours too, so replicas stay equal."""
        return trainer.strategy.reduce(router_grad, reduce_op="mean")

    def _cel_gradient(
        self,
        probe: LayerProbe,
        conflicts: LayerConflicts,
        conflicting: torch.Tensor,
        trainer: L.Trainer,
        finite: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The CEL value and its gradient w.r.t. the router weight only, scaled as the LM loss is
        (λ, 1 / accumulation, fp16 loss scale); zeros when skipped or nothing conflicts."""
        weight = probe.router_weight
        zero_grad = torch.zeros_like(weight)
        if not finite or not bool(conflicting.any()):
            return torch.zeros((), device=weight.device), zero_grad
        router_input = probe.routing().router_input.detach().float()  # (N, H)
        with torch.enable_grad():
            logits = router_input @ weight.float().T  # (N, E): a tiny product, recomputed router-only
            rows, experts = conflicts.rows[conflicting], conflicts.expert[conflicting]  # (P_c,), (P_c,)
            loss = conflict_elimination_loss(logits, rows, experts, self.loss_type)
            if self.loss_weight == 0:
                return loss.detach(), zero_grad
            scale = self.loss_weight / trainer.accumulate_grad_batches
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            if scaler is not None:
                scale = scale * scaler.get_scale()
            (grad,) = torch.autograd.grad(loss * scale, weight)
        if not torch.isfinite(grad).all():
            return loss.detach(), zero_grad
        return loss.detach(), grad

    # -- statistics ---------------------------------------------------------------------------------
    def _update_counts(self, layers: list[LayerConflicts], conflicting_masks: list[torch.Tensor]) -> None:
        num_experts = self.conflict_counts.shape[1]
        for index, (conflicts, conflicting) in enumerate(zip(layers, conflicting_masks, strict=True)):
            assigned = conflicts.expert[conflicts.has_grad]
            self.assignment_counts[index] += torch.bincount(assigned, minlength=num_experts).cpu()
            self.conflict_counts[index] += torch.bincount(
                conflicts.expert[conflicting], minlength=num_experts
            ).cpu()

    def _log_scalars(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        layers: list[LayerConflicts],
        cel_losses: list[torch.Tensor],
    ) -> None:
        """stgc/<stat>/<layer> and overall: conflict ratio (also by modality), cosine mean/std, CEL;
        per layer × expert: conflict ratio and load. Each rank flags its own tokens (against its own
        experts' mean gradients); the logged figures are global, from sums reduced over the ranks."""
        num_experts = self.conflict_counts.shape[1]
        sums = torch.stack(
            [
                _layer_sums(c, self.threshold, cel, num_experts)
                for c, cel in zip(layers, cel_losses, strict=True)
            ]
        )  # (layers, SUMS + 2 * experts)
        sums = trainer.strategy.reduce(sums, reduce_op="sum") if trainer.world_size > 1 else sums
        metrics: dict[str, torch.Tensor] = {}
        for probe, layer_sums in zip(self.probes, sums, strict=True):
            metrics.update(_layer_metrics(probe.name, layer_sums, probe.num_experts, trainer.world_size))
        metrics.update(_layer_metrics("all", sums.sum(0), 0, trainer.world_size * len(layers)))
        metrics["stgc/skipped_nonfinite"] = torch.tensor(float(self.skipped_nonfinite))
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False)

    def _log_histograms(self, trainer: L.Trainer, layers: list[LayerConflicts]) -> None:
        """Cosine histograms per layer and a layer × expert heatmap of conflict ratios (TensorBoard)."""
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not loggers or trainer.global_rank != 0:
            return
        ratios = torch.zeros(len(layers), self.conflict_counts.shape[1])
        for index, conflicts in enumerate(layers):
            cosine = conflicts.cosine[conflicts.has_grad].detach().float().cpu()
            expert = conflicts.expert[conflicts.has_grad].cpu()
            conflicting = (cosine < self.threshold).float()
            counts = torch.bincount(expert, minlength=ratios.shape[1]).float().clamp(min=1)
            ratios[index] = torch.bincount(expert, weights=conflicting, minlength=ratios.shape[1]) / counts
            for logger in loggers:
                logger.experiment.add_histogram(
                    f"stgc/cosine/{self.probes[index].name}", cosine, trainer.global_step
                )
        image = _heatmap([p.name for p in self.probes], ratios)
        for logger in loggers:
            logger.experiment.add_image(
                "stgc/conflict_ratio_heatmap", image, trainer.global_step, dataformats="HWC"
            )

    # -- checkpointing ------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "measured_micro_batches": self.measured_micro_batches,
            "skipped_nonfinite": self.skipped_nonfinite,
            "conflict_counts": self.conflict_counts,
            "assignment_counts": self.assignment_counts,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.measured_micro_batches = state_dict["measured_micro_batches"]
        self.skipped_nonfinite = state_dict["skipped_nonfinite"]
        self.conflict_counts = state_dict["conflict_counts"]
        self.assignment_counts = state_dict["assignment_counts"]


SUMS = (
    "tokens",
    "conflicting",
    "cosine",
    "cosine_sq",
    "text",
    "text_conflicting",
    "image",
    "image_conflicting",
    "cel",
)


def _layer_sums(
    conflicts: LayerConflicts, threshold: float, cel_loss: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """One layer's statistics as sums (named by SUMS, then assignments and conflicts per expert), so
    that ranks combine by adding them."""
    cosine = conflicts.cosine[conflicts.has_grad].double()  # (S_g,)
    conflicting = cosine < threshold
    expert = conflicts.expert[conflicts.has_grad]
    modality = conflicts.modality[conflicts.has_grad] if conflicts.modality is not None else None
    by_modality = []
    for value in (0, 1):  # text, image
        selected = conflicting[modality == value] if modality is not None else conflicting[:0]
        by_modality += [selected.numel(), selected.sum()]
    sums = [cosine.numel(), conflicting.sum(), cosine.sum(), cosine.square().sum(), *by_modality, cel_loss]
    return torch.cat(
        [
            torch.stack([torch.as_tensor(v, dtype=torch.float64, device=cosine.device) for v in sums]),
            torch.bincount(expert, minlength=num_experts).double(),
            torch.bincount(expert[conflicting], minlength=num_experts).double(),
        ]
    )


def _layer_metrics(
    layer: str, sums: torch.Tensor, num_experts: int, cel_count: int
) -> dict[str, torch.Tensor]:
    """Conflict ratios, the paper's gradient consistency (cosine mean and std), the CEL averaged over
    `cel_count` terms, and per expert (when num_experts > 0) the load and conflict ratio."""
    s = dict(zip(SUMS, sums.float(), strict=False))
    metrics = {f"stgc/cel_loss/{layer}": s["cel"] / cel_count}
    if s["tokens"] > 0:
        mean = s["cosine"] / s["tokens"]
        metrics[f"stgc/conflict_ratio/{layer}"] = s["conflicting"] / s["tokens"]
        metrics[f"stgc/cosine_mean/{layer}"] = mean
        metrics[f"stgc/cosine_std/{layer}"] = (s["cosine_sq"] / s["tokens"] - mean**2).clamp(min=0).sqrt()
    for modality in ("text", "image"):
        if s[modality] > 0:
            metrics[f"stgc/conflict_ratio_{modality}/{layer}"] = s[f"{modality}_conflicting"] / s[modality]
    assignments, conflicts = sums[len(SUMS) :].float().view(2, -1)[:, :num_experts]  # (E,), (E,)
    for e in range(num_experts):
        metrics[f"stgc/expert_load/{layer}/expert_{e}"] = assignments[e] / assignments.sum().clamp(min=1)
        metrics[f"stgc/expert_conflict_ratio/{layer}/expert_{e}"] = conflicts[e] / assignments[e].clamp(min=1)
    return metrics


def _heatmap(layer_names: list[str], ratios: torch.Tensor) -> torch.Tensor:
    """Render a (layers, experts) matrix of conflict ratios as an RGB image (H, W, 3) uint8."""
    import matplotlib.pyplot as plt  # only when a heatmap is due: the import is slow

    figure, axes = plt.subplots(figsize=(1 + 0.6 * ratios.shape[1], 0.8 + 0.5 * ratios.shape[0]), dpi=100)
    shown = axes.imshow(ratios.numpy(), vmin=0, vmax=1, cmap="viridis")
    axes.set_xlabel("expert")
    axes.set_yticks(range(len(layer_names)), layer_names)
    figure.colorbar(shown, ax=axes, label="conflict ratio")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    return torch.from_numpy(np.array(Image.open(buffer).convert("RGB")))
