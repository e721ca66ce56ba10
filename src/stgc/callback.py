"""STGC as a Lightning Callback: stgc.method.STGCMethod run in a Trainer's hooks — its schedule, the
strategy checks, the loss scale, the logging and the checkpointed state. The method itself (cosines,
flags, selection, the CEL's router gradient, statistics) is torch only (docs/design.md §2-§4)."""

from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from stgc.method import Selection, Settings, STGCMethod
from stgc.method.loss import LossForm
from stgc.method.modality import TokenModality
from stgc.method.probes import SparseMoEProbe
from stgc.method.statistics import host_values
from stgc.report.layout import write_custom_scalars
from stgc.report.picture import ConflictPictureData, ConflictPictureModel
from stgc.report.tensorboard import write_conflict_images, write_scalars

REFUSED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy)  # FSDP2 (ModelParallelStrategy) is supported


class STGC(L.Callback):
    """Solving Token Gradient Conflict (Yang et al., ICLR 2025) for any LightningModule with MoE layers.

    Args:
        threshold: a token conflicts in an expert when cos(g_t, ḡ_e) < threshold. The defaults
            (τ, λ, form: stgc.method.Settings) are the paper's form at the first study's values;
            scripts/reproduce.py's study found no setting better than the baseline (README's Results).
        loss_weight: λ of the CEL; 0 only measures (how a baseline records the same statistics).
        loss_type: "negated_logits" (the reviewers' reading of the paper's Eq. 8; can raise a second
            choice's score), "negated_logits_per_expert" or "unlikelihood" (both always lower the
            conflicting expert's score), or a `stgc.method.loss.LossForm` of your own; see stgc.method.loss.
        gradient: "exact" (the gradient w.r.t. all of the expert's weights) or "output" (w.r.t. the
            expert's output, routing weight included: the paper's cheaper approximation).
        mean: compare g_t with the sum over "all" the expert's tokens (the paper's ḡ_e, which holds
            g_t itself: null level ≈ 1/√n_e) or over the "others" (leave-one-out: null level 0).
        selection: the CEL applies to the conflicting assignments ("gradient": STGC) or, as a control,
            to as many assignments drawn at random in each layer and micro-batch ("random"), or to what a
            `stgc.method.Selection` of your own chooses; the logged conflict statistics are the
            gradient's either way.
        start_step: first optimizer step at which STGC runs.
        every_n_steps: run on every n-th optimizer step (conflicts cost ~1/3 of the experts' time).
        log_every_n_steps: scalar logging period (default: the trainer's).
        histogram_every_n_steps: period of cosine histograms, the layer × expert heatmap, the exact vs
            output correlation and the conflict picture (0: never).
    """

    def __init__(
        self,
        threshold: float = Settings.threshold,
        loss_weight: float = Settings.loss_weight,
        loss_type: str | LossForm = Settings.loss_type,
        gradient: str = Settings.gradient,
        mean: str = Settings.mean,
        selection: str | Selection = Settings.selection,
        start_step: int = 0,
        every_n_steps: int = 1,
        log_every_n_steps: int | None = None,
        histogram_every_n_steps: int = 500,
    ) -> None:
        try:
            self.method = STGCMethod(
                threshold=threshold,
                loss_weight=loss_weight,
                loss_type=loss_type,
                gradient=gradient,
                mean=mean,
                selection=selection,
            )
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
        self.start_step = start_step
        self.every_n_steps = every_n_steps
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self._reroute_step: int | None = None  # the logging step whose reroutes are measured once it stepped

    @property
    def state_key(self) -> str:
        settings = self.method.settings
        return self._generate_state_key(
            threshold=settings.threshold,
            loss_weight=settings.loss_weight,
            loss_type=settings.loss_name,
            gradient=settings.gradient,
            mean=settings.mean,
            selection=settings.selection_name,
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
        with_moe_charts = all(isinstance(probe, SparseMoEProbe) for probe in self.method.probes)
        for logger in self._tensorboards(trainer):  # before the module's layout: TensorBoard reads the first
            write_custom_scalars(logger.experiment, self.method.layer_names, moe=with_moe_charts)

    def _attach(self, pl_module: L.LightningModule) -> None:
        try:
            self.method.attach(pl_module)
        except ValueError as error:
            raise MisconfigurationException(f"STGC: {error}. Set `requires_grad` on the experts.") from error

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.method.detach()

    # -- one micro-batch ----------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step < self.start_step or (step - self.start_step) % self.every_n_steps:
            self.method.end()
            return
        histogram = self._histogram_step(step)
        # the conflict picture compares its fixed sample with this micro-batch's experts
        picture = (
            histogram
            and trainer.global_rank == 0
            and not isinstance(trainer.strategy, ModelParallelStrategy)  # a sharded forward needs every rank
            and isinstance(pl_module, ConflictPictureModel)
            and isinstance(trainer.datamodule, ConflictPictureData)
        )
        modality = pl_module.token_modality(batch) if isinstance(pl_module, TokenModality) else None
        self.method.begin(batch, diagnostics=histogram, keep_reference=picture, modality=modality)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.method.end()  # a micro-batch whose backward never ran (training_step returned None)
        if self._reroute_step is not None and trainer.global_step > self._reroute_step:  # routers updated
            self._reroute_step = None
            self._log(trainer, self.method.measure_reroutes())

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.method.capturing:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        grad_scale = (
            scaler.get_scale() if scaler is not None and self.method.settings.loss_weight > 0 else 1.0
        )
        logging = (trainer.global_step + 1) % (self.log_every_n_steps or trainer.log_every_n_steps) == 0
        result = self.method.after_backward(trainer.accumulate_grad_batches, grad_scale, logging)
        if not result.finite:
            return
        self._log(trainer, result.metrics)
        if logging:
            self._reroute_step = trainer.global_step
        if self._histogram_step(trainer.global_step):
            self._log(trainer, self.method.exact_output_pearson(result.layers))
            writers = [
                logger.experiment for logger in self._tensorboards(trainer) if trainer.global_rank == 0
            ]
            picture = self._conflict_picture(trainer, pl_module) if writers else None
            self.method.drop_reference()  # the picture's sums, whether drawn or not
            for writer in writers:
                names = self.method.layer_names
                write_conflict_images(
                    writer, trainer.global_step, names, result.layers, result.stats, picture
                )

    def _histogram_step(self, step: int) -> bool:
        return bool(self.histogram_every_n_steps) and step % self.histogram_every_n_steps == 0

    @staticmethod
    def _tensorboards(trainer: L.Trainer) -> list[TensorBoardLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, Tensor]) -> None:
        """Straight to the loggers, as Lightning's LearningRateMonitor does, with one host sync for all
        values (`LightningModule.log` costs ~0.2 ms a metric, and there are a few per layer and expert),
        TensorBoard's as one event; and into `trainer.callback_metrics`. Those not defined on this step
        (NaN) are left out."""
        if not metrics:
            return
        scalars = host_values(metrics)
        trainer.callback_metrics.update({name: metrics[name] for name in scalars})
        if trainer.loggers and trainer.is_global_zero:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger) and not logger._prefix:
                    write_scalars(logger.experiment, scalars, step)
                else:
                    logger.log_metrics(scalars, step=step)

    def _conflict_picture(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        """The module's drawing of where the DataModule's fixed sample conflicts with what this micro-batch
        asked of each expert (stgc.report.picture); None when nothing was kept or there is no sample."""
        if not self.method.has_reference:  # rank > 0, FSDP2, no protocol
            return None
        sample = trainer.datamodule.conflict_picture_sample()
        if sample is None:
            return None
        sample = move_data_to_device(sample, pl_module.device)
        length = sample["input_ids"].numel() if isinstance(sample, dict) and "input_ids" in sample else None
        share = self.method.conflict_share(
            lambda: pl_module.conflict_picture_loss(sample), length, trainer.precision_plugin.forward_context
        )
        return pl_module.conflict_picture(sample, share)

    # -- checkpointing ------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return self.method.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.method.load_state_dict(state_dict)
