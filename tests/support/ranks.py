"""What each DDP rank saw and holds, written to <out_dir>/rank<r>.pt for the DDP test."""

from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from torch.distributed.tensor import DTensor


class RecordRanks(L.Callback):
    """Per rank: the record keys (id, occurrence) of each epoch's train and val batches, the STGC conflict counts of
    each step, the final weights, and (rank 0) the logged metrics of the last step."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.train_ids: dict[int, list[tuple[str, int]]] = defaultdict(list)
        self.val_ids: dict[int, list[tuple[str, int]]] = defaultdict(list)
        self.step_counts: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _stgc(self, trainer: L.Trainer):
        return next(cb for cb in trainer.callbacks if type(cb).__name__ == "STGC")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train_ids[trainer.current_epoch] += batch["keys"]

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_ids[trainer.current_epoch] += batch["keys"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stgc = self._stgc(trainer)
        self.step_counts.append((stgc.method.conflict_counts.clone(), stgc.method.assignment_counts.clone()))

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "train_ids": dict(self.train_ids),
                "val_ids": dict(self.val_ids),
                "step_counts": self.step_counts,
                "state_dict": full_state_dict(pl_module),
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            },
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's whole weights, gathered from the shards under FSDP2 (a collective on every rank)."""
    return {
        name: value.full_tensor() if isinstance(value, DTensor) else value
        for name, value in module.state_dict().items()
    }
