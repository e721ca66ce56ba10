"""Fault injection for the resume tests, loaded by `stgc fit` through class paths on its command line."""

import os
import time
from pathlib import Path
from typing import Any

import lightning as L

from stgc.checkpoint import AtomicCheckpointIO


def _stall(marker: str) -> None:
    """Tell the test where we are, then wait to be killed."""
    Path(marker).touch()
    time.sleep(600)


class StallAtEpoch(L.Callback):
    """Stalls when epoch `epoch` starts, i.e. after the previous epoch's checkpoint was written; only in
    the run logged as `version` when one is given, and only once: not when `marker` exists already
    (so the same arguments can run again past the stall)."""

    def __init__(self, epoch: int, marker: str, version: str | None = None) -> None:
        self.epoch = epoch
        self.marker = marker
        self.version = version

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        in_run = self.version is None or trainer.logger.version == self.version
        if trainer.current_epoch == self.epoch and in_run and not Path(self.marker).exists():
            _stall(self.marker)


class StallingCheckpointIO(AtomicCheckpointIO):
    """Writes checkpoint number `stall_at` (counting from 1) halfway, then stalls."""

    def __init__(self, stall_at: int, marker: str) -> None:
        super().__init__()
        self.stall_at = stall_at
        self.marker = marker
        self.saves = 0

    def write(self, checkpoint: dict[str, Any], f: Any) -> None:
        self.saves += 1
        if self.saves < self.stall_at:
            return super().write(checkpoint, f)
        f.write(os.urandom(4096))  # a torn file, as a kill mid-write leaves it
        f.flush()
        _stall(self.marker)


class StopAfterEpoch(L.Callback):
    """Ends the fit cleanly after epoch `epoch` (and its checkpoint): a run stopped, to be resumed, on
    every rank at once."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True
