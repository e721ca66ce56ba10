"""The vision-language model: vision tower -> projector -> spliced into a causal LM's input embeddings."""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from stgc.constants import IMAGE_TOKEN_ID, MODALITIES
from stgc.model.vision import VisionTower
from stgc.moe import routing_context

# Notation: B batch, L sequence length (image positions included), P image tokens per image
# (its patches, CLS first if kept), V vision width, D the LM's embedding width.


class LVLM(nn.Module):
    """LLaVA-style model. `input_ids` hold P consecutive IMAGE_TOKEN_ID positions per image;
    those positions get the image's projected features, in order."""

    def __init__(
        self, vision_tower: VisionTower, projector: nn.Module, language_model: PreTrainedModel
    ) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model

    def embed(self, images: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings with image patches spliced in, and the (B, L) mask of image positions."""
        image_mask = input_ids == IMAGE_TOKEN_ID  # (B, L)
        text_ids = input_ids.masked_fill(image_mask, 0)
        embeds = self.language_model.get_input_embeddings()(text_ids)  # (B, L, D)
        has_image = image_mask.any(dim=1)  # (B,)
        if has_image.any():
            patches = self.projector(self.vision_tower(images[has_image]))  # (B_img, P, D)
            num_positions = int(image_mask.sum())
            if num_positions != patches.shape[0] * patches.shape[1]:
                raise ValueError(
                    f"input_ids hold {num_positions} image positions for {patches.shape[0]} images, "
                    f"expected {patches.shape[1]} per image (the vision tower's token count)"
                )
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), patches.to(embeds.dtype))
        return embeds, image_mask

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Teacher-forced pass; with labels, `.loss` is the mean CE over non-ignored targets."""
        embeds, image_mask = self.embed(images, input_ids)
        # MoE layers route only real tokens and record each token's modality
        modality = torch.where(image_mask, MODALITIES["image"], MODALITIES["text"])  # (B, T)
        with routing_context(self.language_model, attention_mask.bool(), modality):
            return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int,
        pad_token_id: int,
    ) -> torch.Tensor:
        """Greedy continuation of LEFT-padded prompts: (B, <= max_new_tokens) new token ids."""
        embeds, _ = self.embed(images, input_ids)
        return self.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
