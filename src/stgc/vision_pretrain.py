"""Stage 0: CLIP-pretrain the open_clip vision tower on image-caption pairs (as every LLaVA's tower was).

The easy-vqa towers start untrained, and a ViT learns shapes slowly through an LM's captioning
loss alone; open_clip's own contrastive loss teaches it in a few hundred steps. The run ends by
saving the whole CLIP state dict, which `LVLMModule(vision_pretrained=...)` loads through
open_clip's regular checkpoint loading. Batches come from PretrainDataModule: the caption is the
trained (non-ignored) label ids of each sample.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from PIL import Image

from stgc.checkpoint import KeepsRNGState
from stgc.constants import IGNORE_INDEX
from stgc.data.collate import is_empty
from stgc.model.language_model import load_tokenizer
from stgc.model.vision import no_random_init_warning  # importing it registers the bundled tiny configs
from stgc.optim import SkipsBadSteps, adamw_warmup_cosine


class CLIPPretrainModule(SkipsBadSteps, KeepsRNGState):
    """Contrastive image-caption training of an open_clip model; writes `export_path` at the end."""

    def __init__(
        self,
        tokenizer: str,
        export_path: str,
        vision_model: str = "stgc-vit-tiny",
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_ratio: float = 0.05,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)
        with no_random_init_warning():  # a stage 0 resumed from its checkpoint is not random
            self.clip, self.train_transform, self.eval_transform = open_clip.create_model_and_transforms(
                vision_model
            )
        text = self.clip.transformer if hasattr(self.clip, "transformer") else None
        if text is None or len(self.tokenizer) > self.clip.vocab_size:
            raise ValueError(
                f"{vision_model!r} needs a text tower whose vocab holds the tokenizer's {len(self.tokenizer)} ids"
            )
        self.context_length = self.clip.context_length
        self.loss = open_clip.ClipLoss()

    # what the DataModules need; the LLaVA template's image positions are not used here
    num_image_tokens = 1

    def image_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        return self.train_transform if train else self.eval_transform

    def captions(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, L) labels -> (B, context_length) caption ids (+ eos), padded with the tokenizer's pad id.

        Each row's trained ids are packed to its front by scatter, without a per-row mask: no host sync.
        """
        trained = labels != IGNORE_INDEX  # (B, L)
        position = trained.cumsum(dim=1) - 1  # (B, L) where each trained id goes in its caption
        keep = trained & (position < self.context_length)  # (B, L)
        column = torch.where(keep, position, self.context_length)  # (B, L) the rest to a spare column
        texts = torch.full(
            (labels.shape[0], self.context_length + 1), self.tokenizer.pad_token_id, device=labels.device
        )  # (B, context_length + 1)
        texts.scatter_(1, column, torch.where(keep, labels, self.tokenizer.pad_token_id))
        return texts[:, : self.context_length]

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor | None:
        if is_empty(batch):
            return self.empty_batch_loss() if stage == "train" else None
        image_features, text_features, logit_scale = self.clip(
            batch["images"], self.captions(batch["labels"])
        )[:3]
        loss = self.loss(image_features, text_features, logit_scale)
        batch_size = batch["images"].shape[0]
        self.log(f"{stage}/clip_loss", loss, prog_bar=True, batch_size=batch_size)
        if stage == "val":  # in-batch retrieval: does each image pick its own caption's text?
            similarity = image_features @ text_features.T
            same_caption = (
                self.captions(batch["labels"])[:, None] == self.captions(batch["labels"])[None]
            ).all(-1)
            hit = same_caption[torch.arange(batch_size), similarity.argmax(-1)].float().mean()
            self.log("val/retrieval_acc", hit, batch_size=batch_size)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def on_train_end(self) -> None:
        """Save the CLIP state dict where the LVLM's `vision_pretrained` will load it."""
        if self.trainer.is_global_zero:
            Path(self.hparams.export_path).parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.clip.state_dict(), self.hparams.export_path)

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        return adamw_warmup_cosine(self, self.parameters(), h.lr, h.weight_decay, h.warmup_ratio)
