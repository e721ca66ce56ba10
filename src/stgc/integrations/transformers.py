"""STGC in transformers' Trainer: `STGCTrainer` runs stgc.method.STGCMethod around each micro-batch's
backward — before the Trainer clips and steps, as the Lightning callback does — and logs its metrics
with the Trainer's own (`logging_steps`, every reporter of `report_to`).

    trainer = STGCTrainer(model=model, args=args, train_dataset=data, stgc=STGCMethod(loss_weight=0.01))

Combine it with another Trainer subclass by putting it first: `class MyTrainer(STGCTrainer, SFTTrainer)`.
"""

from typing import Any

from torch import Tensor, nn
from transformers import Trainer

from stgc.method import STGCMethod
from stgc.method.statistics import host_values


class STGCTrainer(Trainer):
    """transformers.Trainer with STGC on the model's MoE layers (`stgc`: the method and its settings).

    Refused under DeepSpeed and FSDP, which flatten the parameters, as the Lightning callback refuses them.
    STGC's running counts (`stgc.state_dict()`) are not written into the Trainer's checkpoints.
    """

    def __init__(self, *args: Any, stgc: STGCMethod, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "STGC does not support DeepSpeed or FSDP in transformers' Trainer: they shard the parameters "
                "into flat buffers, so the per-expert weight gradients STGC reads are not there"
            )
        self.stgc = stgc
        self._stgc_metrics: dict[str, float] = {}  # the last logging step's, for the Trainer's next log
        self._reroute_step: int | None = None  # the logging step whose reroutes are due once it stepped

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """The Trainer's forward and backward of one micro-batch, with STGC's capture around them and the
        CEL's router gradient added after the backward (scaled as the Trainer scales the loss)."""
        if not self.stgc.probes:
            self.stgc.attach(self.model)  # the unwrapped model: DDP's wrapper holds the same parameters
        step = self.state.global_step
        if self._reroute_step is not None and step > self._reroute_step:  # the routers have been updated
            self._reroute_step = None
            self._keep(self.stgc.measure_reroutes())
        self.stgc.begin(inputs)
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            self.stgc.end()
            raise
        logging = self.args.logging_steps > 0 and (step + 1) % self.args.logging_steps == 0
        scaler = getattr(self.accelerator, "scaler", None)
        grad_scale = scaler.get_scale() if scaler is not None and self.stgc.settings.loss_weight > 0 else 1.0
        result = self.stgc.after_backward(self.current_gradient_accumulation_steps, grad_scale, logging)
        if result.finite and logging:
            self._keep(result.metrics)
            self._reroute_step = step
        return loss

    def _keep(self, metrics: dict[str, Tensor]) -> None:
        self._stgc_metrics.update(host_values(metrics))  # one device-to-host copy

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's training logs, with STGC's latest metrics added (evaluation logs left alone)."""
        if "loss" in logs:
            logs = {**logs, **self._stgc_metrics}
            self._stgc_metrics = {}
        super().log(logs, *args, **kwargs)
