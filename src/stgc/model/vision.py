"""Vision tower: an open_clip ViT that returns the image tokens of one chosen layer (LLaVA style)."""

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

# The tiny ViT configs bundled with stgc (e.g. "stgc-vit-tiny") join open_clip's registry on import.
open_clip.add_model_config(Path(__file__).parent / "vision_configs")


@contextmanager
def no_random_init_warning() -> Iterator[None]:
    """Silence open_clip's "No pretrained weights loaded ... Model initialized randomly." (a root-logger
    warning) while a model is built: it is printed on every build without `pretrained`, also when a
    checkpoint's weights are loaded right after (init_from, --ckpt_path, load_from_checkpoint)."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


class VisionTower(nn.Module):
    """Image-token features (patches, optionally CLS) of an open_clip vision transformer.

    `feature_layer` indexes the transformer blocks like a Python list: LLaVA takes the
    penultimate block's output (-2); the blocks after it are dropped. `select_feature` is LLaVA's
    mm_vision_select_feature: "patch" drops the CLS token, "cls_patch" keeps it first. `pool`
    average-pools the patch grid in pool x pool cells (LLaVA-OneVision pools video frames 2x2), so
    the LM reads fewer image tokens.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        feature_layer: int = -2,
        select_feature: str = "patch",
        pool: int = 1,
    ) -> None:
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature={select_feature!r}; choose 'patch' or 'cls_patch'")
        if pretrained is not None and not Path(pretrained).is_file():
            raise FileNotFoundError(f"vision_pretrained={pretrained!r} is not a local checkpoint file")
        with no_random_init_warning():
            clip, self.train_transform, self.eval_transform = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained
            )
        self.visual = clip.visual  # the text tower is dropped
        if not isinstance(self.visual, open_clip.transformer.VisionTransformer):
            raise TypeError(f"{model_name!r} has a {type(self.visual).__name__} tower; a ViT is required")
        num_layers = len(self.visual.transformer.resblocks)
        if not -num_layers <= feature_layer < num_layers:
            raise ValueError(f"feature_layer={feature_layer} is out of range for {num_layers} blocks")
        # Blocks past the feature layer and the pooling head are never used: drop them.
        self.visual.prune_intermediate_layers([feature_layer % num_layers], prune_norm=True, prune_head=True)
        self.hidden_size: int = self.visual.transformer.width
        self.grid: tuple[int, int] = tuple(self.visual.grid_size)
        if pool < 1 or self.grid[0] % pool or self.grid[1] % pool:
            raise ValueError(f"pool={pool} must be >= 1 and divide the {self.grid} patch grid")
        self.pool = pool
        self.keep_cls = select_feature == "cls_patch"
        self.num_tokens: int = (self.grid[0] // pool) * (self.grid[1] // pool) + self.keep_cls

    def image_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        """open_clip's own preprocessing for this tower: PIL image -> (3, H, W) tensor."""
        return self.train_transform if train else self.eval_transform

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, num_tokens, hidden_size) features (CLS first if kept)."""
        out = self.visual.forward_intermediates(
            images,
            indices=1,  # the last kept block
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=self.keep_cls,
        )
        patches = out["image_intermediates"][0]  # (B, grid_h * grid_w, hidden_size)
        if self.pool > 1:
            grid = patches.transpose(1, 2).unflatten(2, self.grid)  # (B, hidden_size, grid_h, grid_w)
            patches = F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)  # (B, num_pooled, hidden_size)
        if self.keep_cls:
            return torch.cat([out["image_intermediates_prefix"][0], patches], dim=1)
        return patches
