"""AdamW with linear warmup and cosine decay, as LLaVA / MoE-LLaVA train (shared by the LightningModules)."""

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
