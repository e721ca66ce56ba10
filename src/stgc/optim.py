"""Optimisation shared by the LightningModules: AdamW with linear warmup and cosine decay (as LLaVA /
MoE-LLaVA train), and the guard that skips a step whose gradients are non-finite."""

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to 0 at total_steps (a LambdaLR factor)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def adamw_warmup_cosine(
    module: L.LightningModule,
    parameters: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    warmup_ratio: float,
) -> dict[str, Any]:
    """configure_optimizers' return value, with the schedule stepped per optimizer step."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    total_steps = module.trainer.estimated_stepping_batches
    warmup_steps = max(1, int(warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SkipsBadSteps(L.LightningModule):
    """Skips an optimizer step, on every rank at once, when a gradient is non-finite or the batch was
    empty (all its records bad): the weights and optimizer state stay as they were. Skips are
    counted (kept in checkpoints) and logged as train/skipped_steps."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # a mixin: the LightningModule's own arguments pass through
        self.skipped_steps = 0
        self._empty_batch = False

    def empty_batch_loss(self) -> torch.Tensor:
        """A zero loss that touches every trained parameter (DDP expects their gradients); the
        step it leads to is skipped."""
        self._empty_batch = True
        return sum((p.sum() for p in self.parameters() if p.requires_grad), torch.zeros(())) * 0.0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())  # one sync
        bad = self.trainer.strategy.reduce_boolean_decision(self._empty_batch or not finite, all=False)
        self._empty_batch = False
        if bad:
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without a gradient alone
            self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
