"""The LightningModule: trains the LVLM through stages I-III and evaluates it on VQA."""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch import nn
from torchmetrics import MeanMetric

from stgc.checkpoint import KeepsRNGState
from stgc.constants import IMAGE_TOKEN_ID
from stgc.data.collate import is_empty, pad_token_id, prompt_batch
from stgc.evaluation import VQAEvaluation
from stgc.model.language_model import build_language_model, load_tokenizer
from stgc.model.lvlm import LVLM
from stgc.model.projector import build_projector
from stgc.model.sharding import fully_shard_lvlm
from stgc.model.vision import VisionTower
from stgc.moe import moe_layers, moe_losses, routing_stats, short_layer_name, upcycle
from stgc.moe.layer import SparseMoE
from stgc.moe.recompute import enable_gradient_checkpointing
from stgc.moe.upcycle import decoder_layers
from stgc.optim import SkipsBadSteps
from stgc.report.figures import as_display_image, conflict_figure, token_grid
from stgc.report.layout import write_custom_scalars
from stgc.trainable import check_groups, train_only

PARAMETER_GROUPS = ("vision_tower", "projector", "lm", "experts", "routers", "dense_mlps")


class LVLMModule(VQAEvaluation, SkipsBadSteps, KeepsRNGState):
    """One module for all stages: `moe` upcycles the LM (stage III); `trainable` picks the groups
    that train (MoE-LLaVA: stage I ["projector"], stage II ["projector", "lm"], stage III
    ["experts", "routers", "dense_mlps"]); `init_from` starts from the previous stage's checkpoint;
    `gradient_checkpointing` recomputes the LM's decoder layers (MoE layers included) in backward,
    trading compute for activation memory."""

    def __init__(
        self,
        tokenizer: str,
        lm_config: dict[str, Any] | None = None,
        lm_path: str | None = None,
        vision_model: str = "stgc-vit-tiny",
        vision_pretrained: str | None = None,
        vision_feature_layer: int = -2,
        vision_select_feature: str = "patch",
        vision_token_pool: int = 1,
        projector: str = "mlp2x_gelu",
        moe: dict[str, Any] | None = None,
        router_aux_loss_coef: float = 0.01,
        router_z_loss_coef: float = 0.0,
        trainable: Sequence[str] = ("projector",),
        init_from: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        max_new_tokens: int = 8,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_groups(trainable, PARAMETER_GROUPS)  # before the model is built
        self.tokenizer = load_tokenizer(tokenizer)
        vision_tower = VisionTower(
            vision_model, vision_pretrained, vision_feature_layer, vision_select_feature, vision_token_pool
        )
        language_model = build_language_model(self.tokenizer, lm_path, lm_config)
        text_size = language_model.get_input_embeddings().embedding_dim
        self.model = LVLM(
            vision_tower, build_projector(projector, vision_tower.hidden_size, text_size), language_model
        )
        state_dict = checkpoint_state_dict(init_from) if init_from else None
        checkpoint_is_moe = state_dict is not None and any(".router." in key for key in state_dict)
        if moe is not None and not checkpoint_is_moe:
            self._load(state_dict, init_from)  # a dense stage II checkpoint, then upcycle it
            upcycle(self.model.language_model, **moe)
        else:
            if checkpoint_is_moe and moe is None:
                raise ValueError(f"init_from={init_from!r} holds an MoE model; set `moe` to match it")
            if moe is not None:
                upcycle(self.model.language_model, **moe)
            self._load(state_dict, init_from)
        train_only(self.model, parameter_groups(self.model), trainable, "(is `moe` set?)")
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.model.language_model)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    # -- what the DataModules need from the model --------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        return self.model.vision_tower.num_tokens

    def image_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        return self.model.vision_tower.image_transform(train)

    # -- set-up ---------------------------------------------------------------------------------
    def _load(self, state_dict: dict[str, torch.Tensor] | None, path: str | None) -> None:
        if state_dict is None:
            return
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"init_from={path!r} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )

    def configure_model(self) -> None:
        """Under ModelParallelStrategy (FSDP2): shard the model over the data-parallel mesh."""
        if self.device_mesh is not None:
            fully_shard_lvlm(self.model, self.device_mesh["data_parallel"])

    # -- steps ----------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]):
        return self.model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"])

    def _objective(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What training minimises on a batch: the LM loss plus, with MoE layers, the weighted
        load-balancing and z-losses; also the LM loss alone and the load-balancing loss (None without MoE)."""
        lm_loss = self(batch).loss
        if self.hparams.moe is None:
            return lm_loss, lm_loss, None
        h = self.hparams
        aux_loss, z_loss = moe_losses(self.model)
        return lm_loss + h.router_aux_loss_coef * aux_loss + h.router_z_loss_coef * z_loss, lm_loss, aux_loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if is_empty(batch):  # every record of the batch was bad (reported by the DataModule)
            return self.empty_batch_loss()
        loss, lm_loss, aux_loss = self._objective(batch)
        batch_size = batch["input_ids"].shape[0]
        if aux_loss is not None:
            self.log("train/aux_loss", aux_loss, batch_size=batch_size)
            self._log_routing()
        self.log("train/lm_loss", lm_loss, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def _log_routing(self) -> None:
        """Per MoE layer: balancing loss, expert load (also per modality), entropy, dropped tokens."""
        if (self.global_step + 1) % self.trainer.log_every_n_steps:
            return
        for name, layer in moe_layers(self.model).items():
            record = layer.last_routing
            prefix = f"moe/{short_layer_name(name)}"
            self.log(f"{prefix}/aux_loss", record.aux_loss)
            for key, value in routing_stats(record).items():
                self.log(f"{prefix}/{key}", value)

    def _generate_from(self, prompts: list[torch.Tensor], images: list[torch.Tensor]) -> list[str]:
        """Greedy answers to unpadded prompts (P_i,) with their images (3, H, W)."""
        device = prompts[0].device
        batch = {k: v.to(device) for k, v in prompt_batch(prompts, pad_token_id(self.tokenizer)).items()}
        return self.answer({"images": torch.stack(images), **batch})

    @torch.no_grad()
    def answer(self, batch: dict[str, Any]) -> list[str]:
        """Greedy answers to the batch's left-padded prompts, decoded to text."""
        new_ids = self.model.generate(
            batch["images"],
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            max_new_tokens=self.hparams.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=pad_token_id(self.tokenizer),
        )
        return [text.strip() for text in self.tokenizer.batch_decode(new_ids, skip_special_tokens=True)]

    # -- TensorBoard ------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Give TensorBoard the custom-scalars layout of the MoE layers' charts: per layer, one chart per
        quantity with a line per expert (an STGC callback has written its own, with these, before)."""
        if self.hparams.moe is None:
            return
        layers = [short_layer_name(name) for name in moe_layers(self.model)]
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):  # its experiment does nothing off rank 0
                write_custom_scalars(logger.experiment, layers, stgc=False)

    # -- the conflict picture (stgc.report.picture.ConflictPictureModel) -----------------------------
    def conflict_picture_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The loss training_step minimises on `batch`, without logging: its backward gives the
        conflict picture's token gradients (the forward replaces the MoE layers' `last_routing`)."""
        return self._objective(batch)[0]

    def conflict_picture(self, batch: dict[str, Any], token_share: torch.Tensor) -> np.ndarray:
        """The conflict picture of a one-sample batch as an (H, W, 3) uint8 RGB image: its input image,
        beside it a grey copy with each patch shaded by the share of its image token (a pooled token
        covers pool x pool patches, a CLS token none), and its text tokens drawn as boxes shaded the
        same way (stgc.report.figures.conflict_figure).

        `token_share` (T,): a share in [0, 1] per sequence position of the batch, NaN where a position
        has none (not routed, no assignment); the image tokens are the positions of IMAGE_TOKEN_ID,
        in the vision tower's order (see LVLM.embed).
        """
        ids = batch["input_ids"][0].cpu()  # (T,)
        if token_share.shape != ids.shape:
            raise ValueError(
                f"token_share has shape {tuple(token_share.shape)}; expected ({len(ids)},), one per position"
            )
        share = token_share.detach().float().cpu().numpy()  # (T,)
        is_image = (ids == IMAGE_TOKEN_ID).numpy()  # (T,)
        if is_image.sum() != self.num_image_tokens:
            raise ValueError(
                f"the batch's first sample has {is_image.sum()} image positions; the picture needs one image "
                f"of {self.num_image_tokens} tokens (see LlavaDataModule.conflict_picture_sample)"
            )
        tower = self.model.vision_tower
        pixels = batch["images"][0]  # (3, H, W)
        image = as_display_image(
            pixels, tower.visual.image_mean, tower.visual.image_std, max(1, 512 // max(pixels.shape[1:]))
        )
        shares = token_grid(share[is_image], tower.grid, tower.pool, tower.keep_cls)  # (h/pool, w/pool)
        real = batch["attention_mask"][0].cpu().bool().numpy()  # (T,)
        first_image = int(is_image.argmax())  # the image's tokens show as one "<image>" box
        shown = [t for t in range(len(ids)) if real[t] and (not is_image[t] or t == first_image)]
        tokens = [
            "<image>" if is_image[t] else self.tokenizer.decode([int(ids[t])]).strip() or "␣" for t in shown
        ]
        token_shares = np.array([np.nan if is_image[t] else share[t] for t in shown])
        record_id = batch["keys"][0][0]
        title = f"conflict share per token, step {self.global_step}, record {record_id}"
        return conflict_figure(image, shares, tokens, token_shares, title)


def parameter_groups(model: LVLM) -> dict[str, list[nn.Parameter]]:
    """The LVLM's parameters by the group names that `trainable` accepts."""
    layers = list(moe_layers(model.language_model).values())
    return {
        "vision_tower": list(model.vision_tower.parameters()),
        "projector": list(model.projector.parameters()),
        "lm": list(model.language_model.parameters()),
        "experts": [p for layer in layers for p in layer.experts.parameters()],
        "routers": [p for layer in layers for p in layer.router.parameters()],
        # the MLPs of the decoder layers without experts (MoE-LLaVA's stage III trains them too)
        "dense_mlps": [
            p
            for block in decoder_layers(model.language_model)
            if not isinstance(block.mlp, SparseMoE)
            for p in block.mlp.parameters()
        ],
    }


def checkpoint_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The model weights of a Lightning checkpoint of a module whose model is `self.model`."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return {key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items()}
