"""Each routed token's modality, for STGC's image/text figures: from the image and video token ids in
a transformers model's config (a VLM's `image_token_id`, ...), or from a module that says so itself."""

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from stgc.constants import MODALITIES

IMAGE_TOKEN_ATTRIBUTES = ("image_token_id", "video_token_id", "image_token_index")  # in the configs


@runtime_checkable
class TokenModality(Protocol):
    def token_modality(self, batch: Any) -> Tensor | None:
        """(B, T) per input position of `batch` as the training step receives it: 0 text, 1 image
        (stgc.constants.MODALITIES; a video frame counts as image), or None when it cannot say."""


def image_token_ids(model: nn.Module) -> list[int]:
    """The image and video token ids that the configs of the transformers models in `model` name."""
    found = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            for attribute in IMAGE_TOKEN_ATTRIBUTES:
                value = getattr(module.config, attribute, None)
                if isinstance(value, int) and value >= 0:
                    found.add(value)
    return sorted(found)


def modality_of(input_ids: Tensor, token_ids: list[int]) -> Tensor:
    """(B, T) long: image where `input_ids` holds one of `token_ids`, text elsewhere."""
    ids = torch.tensor(token_ids, device=input_ids.device)
    is_image = torch.isin(input_ids, ids)
    return torch.where(is_image, MODALITIES["image"], MODALITIES["text"])
