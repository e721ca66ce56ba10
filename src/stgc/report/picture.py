"""The conflict picture's protocol: what a LightningModule and a DataModule implement for STGC to draw,
at each histogram step, where a fixed sample's tokens conflict with a training micro-batch's experts
(stgc.module.LVLMModule and stgc.data.LlavaDataModule do)."""

from typing import Any, Protocol, runtime_checkable

import numpy as np
from torch import Tensor


@runtime_checkable
class ConflictPictureData(Protocol):
    def conflict_picture_sample(self) -> Any | None:
        """The one-sample batch the picture shows (on the CPU; the same at every call), or None."""


@runtime_checkable
class ConflictPictureModel(Protocol):
    def conflict_picture_loss(self, batch: Any) -> Tensor:
        """The training loss of `batch`, without logging: its backward gives the picture's token gradients."""

    def conflict_picture(self, batch: Any, token_share: Tensor) -> np.ndarray:
        """The picture as an (H, W, 3) uint8 RGB array, from `token_share` (T,): per sequence position
        of the one-sample `batch`, the share of MoE layers it conflicts in (NaN: none)."""
