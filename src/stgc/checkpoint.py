"""Checkpoints a killed run can resume from: written atomically, and holding every rank's RNG states.

Lightning's own writer stages the file in the system temp folder and moves it into place, which is a
plain (interruptible) copy when that folder is on another filesystem; and its checkpoints hold no
RNG states, so a resumed run draws different random crops than an uninterrupted one.
"""

import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.utilities import rank_zero_warn


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `<dir>/.<name>.<pid>.tmp`, syncs it to disk and renames it over `<dir>/<name>`: a kill at
    any moment leaves the previous checkpoint or the new one, never a torn file. Remote paths go
    through Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(staging, "wb") as f:
                self.write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(staging, path)
        finally:
            staging.unlink(missing_ok=True)

    def write(self, checkpoint: dict[str, Any], f: Any) -> None:
        """Serialise the checkpoint into the open staging file."""
        torch.save(checkpoint, f)


def rng_states() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU and CUDA) generator states, in types that
    `torch.load(weights_only=True)` accepts."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian)
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()  # this rank's own device only
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore `rng_states()`; the CUDA state goes to this process's current device."""
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(device_rng_state(states["cuda"], torch.cuda.current_device()))


def device_rng_state(saved: torch.Tensor | list[torch.Tensor], device: int) -> torch.Tensor:
    """The saved CUDA generator state for `device`: a checkpoint holds one state per rank (or, written
    by an earlier version, one per visible device), so a process that sees fewer devices still resumes."""
    if isinstance(saved, torch.Tensor):
        return saved
    return saved[device] if device < len(saved) else saved[0]


class KeepsRNGState(L.LightningModule):
    """Saves every rank's RNG states in the checkpoint ("rng_states", a list by rank) and restores
    each rank's own on resume, so random augmentation continues as if never interrupted."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        world_size = self._trainer.world_size if self._trainer is not None else 1
        if world_size > 1:
            gathered = [None] * world_size
            torch.distributed.all_gather_object(gathered, rng_states())
            checkpoint["rng_states"] = gathered
        else:
            checkpoint["rng_states"] = [rng_states()]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        states = checkpoint.get("rng_states")
        if self._trainer is None or not states:
            return
        if len(states) != self.trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds the RNG states of {len(states)} ranks, this run has "
                f"{self.trainer.world_size}: random augmentation will not continue exactly as before"
            )
            return
        set_rng_states(states[self.trainer.global_rank])
