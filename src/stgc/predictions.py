"""`stgc predict`'s answers file: one JSON line per answer, in the spirit of LLaVA's answers.jsonl."""

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

ANSWERS_FILE = "answers.jsonl"


class AnswerWriter(BasePredictionWriter):
    """Writes the rows predict_step returns (one per answer: the record's `id` and `occurrence`,
    which together are unique where ids repeat, its `turn`, `question`, generated `prediction`,
    `reference` answer or null, `question_type`) to `path`, in the order of the predicted file.

    Under DDP each rank writes its share to `<path>.rank<r>` as it goes; rank 0 merges the shares
    by sample index at the end, so the file is complete, in order, and the same for any number of
    processes.

    Args:
        path: the answers file (JSON lines); by default answers.jsonl in the run's log folder
            (`trainer.log_dir`: with the stage configs, <save_dir>/<name>/<version>/predict/).
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self._share: Any = None  # this rank's open share file while predicting

    def answers_path(self, trainer: Trainer) -> Path:
        """The file written: `path`, or answers.jsonl in the run's log folder."""
        return Path(self.path) if self.path is not None else Path(trainer.log_dir or ".") / ANSWERS_FILE

    def _share_path(self, trainer: Trainer, rank: int) -> Path:
        path = self.answers_path(trainer)
        return path.with_name(f"{path.name}.rank{rank}")

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        share = self._share_path(trainer, trainer.global_rank)
        share.parent.mkdir(parents=True, exist_ok=True)
        self._share = open(share, "w", encoding="utf-8")  # noqa: SIM115 (closed in on_predict_end)

    @override
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: list[dict[str, Any]],
        batch_indices: list[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Append the batch's rows to this rank's share, each with its sample's index for the merge
        (from the batch: the collate drops skipped records, so Lightning's batch_indices may not line up)."""
        for index, row in zip(batch.get("indices", []), prediction, strict=True):  # none: all skipped
            self._share.write(json.dumps({"index": index, **row}) + "\n")

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Close the shares; rank 0 merges them into the answers file and removes them."""
        self._share.close()
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            shares = [self._share_path(trainer, rank) for rank in range(trainer.world_size)]
            rows = {}  # sample index -> row; a sample a sampler repeated is written once
            for share in shares:
                with open(share, encoding="utf-8") as f:
                    rows.update((row.pop("index"), row) for row in map(json.loads, f))
            path = self.answers_path(trainer)
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(rows[index]) + "\n" for index in sorted(rows))
            for share in shares:
                share.unlink()
        trainer.strategy.barrier()
