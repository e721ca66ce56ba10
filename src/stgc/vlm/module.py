"""The LightningModule of a transformers MoE vision-language model: trains it on the answers of
LLaVA-format conversations (InstructionDataModule, template: chat) and scores it on VQA as LVLMModule does."""

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule, fully_shard
from torchmetrics import MeanMetric
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
)

from stgc.checkpoint import KeepsRNGState
from stgc.data.collate import is_empty, pad_token_id, prompt_batch
from stgc.data.processor import PixelInputs, ProcessorImages, concat_pixel_inputs, image_text_ids
from stgc.evaluation import VQAEvaluation
from stgc.module import checkpoint_state_dict
from stgc.moe.recompute import enable_gradient_checkpointing
from stgc.optim import SkipsBadSteps
from stgc.vlm.parameters import freeze_all_but

# special token ids a config built from scratch takes from the processor when it does not give them: config
# parameter -> the processor's attributes, an id or a token, the first it has; Llama 4 puts image features
# at <|patch|> tokens (its processor's image_token, <|image|>, only opens the global tile); Aria at its
# image_token_id
PROCESSOR_TOKEN_IDS = {
    **{name: (name,) for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                                  "image_start_token_id", "image_end_token_id", "video_start_token_id",
                                  "video_end_token_id")},
    "image_token_index": ("img_patch_token", "image_token_id"), "boi_token_index": ("start_of_img_token",),
    "eoi_token_index": ("end_of_img_token",),
}  # fmt: skip
# the token types a model's forward may take (1 at image positions, 0 elsewhere), each from the config's
# ids of its image positions: Qwen-VL's and ERNIE-4.5-VL's M-RoPE its image tokens; ERNIE-4.5-VL's MoE
# (its vision experts) these and the image's brackets too, as its processor counts them
TOKEN_TYPES = {
    "mm_token_type_ids": ("image_token_id",),
    "moe_mm_token_type_ids": ("image_token_id", "image_start_token_id", "image_end_token_id"),
}
TYPICAL_IMAGE_SIDE = 448  # pixels: the image whose token count estimates lengths (group_by_length)


class TransformersVLMModule(VQAEvaluation, SkipsBadSteps, KeepsRNGState):
    """Any `AutoModelForImageTextToText` with its `AutoProcessor`, both from local folders: a checkpoint
    (`model_path`) or a config to build at random (`model_config`, with its `model_type`); `trainable`
    picks the groups that train (stgc.vlm.parameters: vision_tower, projector, lm, experts, routers);
    `init_from` starts from a Lightning checkpoint of this module; `gradient_checkpointing` recomputes
    the decoder layers (MoE layers included) and vision blocks in backward, the probes marked as for
    LVLMModule (stgc.moe.recompute).

    Batches are the LLaVA DataModules' with `images` a list of each row's pixel inputs (the processor's;
    None for a text-only row). Validation, test, predict and the optimizer are stgc.evaluation's, as
    LVLMModule's; the STGC callback finds the transformers experts and each token's modality (the
    config's image token id).
    """

    def __init__(
        self,
        processor: str,
        model_path: str | None = None,
        model_config: dict[str, Any] | None = None,
        trainable: Sequence[str] = ("experts", "routers"),
        init_from: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        max_new_tokens: int = 8,
        router_aux_loss_coef: float | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if (model_path is None) == (model_config is None):
            raise ValueError(
                "give one of model_path (a local checkpoint) and model_config (a config to build)"
            )
        self.processor = load_processor(processor)
        self.tokenizer = self.processor.tokenizer
        self.model = load_model(model_path, model_config, self.processor)
        if init_from:
            try:
                self.model.load_state_dict(checkpoint_state_dict(init_from))
            except RuntimeError as err:  # missing, unexpected or misshapen weights
                raise ValueError(f"init_from={init_from!r} does not match the model: {err}") from err
        freeze_all_but(self.model, trainable)
        if router_aux_loss_coef is not None:  # the model's own load-balancing loss, as MoE-LLaVA's stage III
            self.model.config.get_text_config().router_aux_loss_coef = router_aux_loss_coef
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        taken = inspect.signature(self.model.forward).parameters
        config = self.model.config
        self.token_types = {  # name -> the image positions' ids, for the token types the model takes
            name: [getattr(config, attribute) for attribute in attributes]
            for name, attributes in TOKEN_TYPES.items()
            if name in taken
        }
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    # -- what the DataModules need from the model (its `processor` too) ------------------------------
    @property
    def num_image_tokens(self) -> int:
        """The length of the processor's text of a typical image: only an estimate of lengths, as each
        record's image is given its own (stgc.data.processor.ProcessorTemplate)."""
        return len(image_text_ids(self.processor, TYPICAL_IMAGE_SIDE, TYPICAL_IMAGE_SIDE))

    def image_transform(self, train: bool) -> ProcessorImages:
        """The processor's image side, for training and evaluation alike (it does not augment)."""
        return ProcessorImages(self.processor)

    # -- set-up ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Under ModelParallelStrategy (FSDP2): each block the model keeps whole (its `_no_split_modules`:
        decoder layers, vision blocks) one unit over the data-parallel mesh, the root the rest."""
        if self.device_mesh is None or isinstance(self.model, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for module in self.model.modules():
            if type(module).__name__ in (self.model._no_split_modules or ()):
                fully_shard(module, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    # -- steps ----------------------------------------------------------------------------------
    def vision_inputs(
        self, input_ids: torch.Tensor, images: list[PixelInputs | None]
    ) -> dict[str, torch.Tensor]:
        """The pixel inputs of the rows' images and the token types of `input_ids` (B, T) that the model
        takes (TOKEN_TYPES: Qwen-VL's M-RoPE, ERNIE-4.5-VL's vision experts); none without images."""
        inputs = concat_pixel_inputs(images)
        if inputs:
            for name, ids in self.token_types.items():  # compared id by id: no tensor copied to the device
                inputs[name] = functools.reduce(torch.logical_or, (input_ids == i for i in ids)).int()
        return inputs

    def forward(self, batch: dict[str, Any], router_logits: bool = False):
        """The model's output on the batch's conversations; its loss is on the labelled answer tokens, plus
        with `router_logits` the model's load-balancing loss (`router_aux_loss_coef` times its aux_loss)."""
        ids = batch["input_ids"]
        return self.model(
            input_ids=ids,
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            **self.vision_inputs(ids, batch["images"]),
            **({"output_router_logits": True} if router_logits else {}),
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if is_empty(batch):  # every record of the batch was bad (reported by the DataModule)
            return self.empty_batch_loss()
        coef = self.hparams.router_aux_loss_coef
        output = self(batch, router_logits=coef is not None)
        batch_size = batch["input_ids"].shape[0]
        if coef is not None:
            self.log("train/aux_loss", output.aux_loss, batch_size=batch_size)
            self.log("train/lm_loss", output.loss - coef * output.aux_loss, batch_size=batch_size)
        self.log("train/loss", output.loss, prog_bar=True, batch_size=batch_size)
        return output.loss

    @torch.no_grad()
    def answer(self, batch: dict[str, Any]) -> list[str]:
        """Greedy answers to the batch's left-padded prompts (with their rows' images), decoded to text."""
        prompt_ids = batch["prompt_input_ids"]  # (B, P)
        sequences = self.model.generate(
            input_ids=prompt_ids,
            attention_mask=batch["prompt_attention_mask"],
            **self.vision_inputs(prompt_ids, batch["images"]),
            max_new_tokens=self.hparams.max_new_tokens,
            do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=pad_token_id(self.tokenizer),
        )  # (B, P + new)
        new_ids = sequences[:, prompt_ids.shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new_ids, skip_special_tokens=True)]

    def _generate_from(self, prompts: list[torch.Tensor], images: list[PixelInputs | None]) -> list[str]:
        """Greedy answers to unpadded prompts (P_i,) with their rows' pixel inputs (VQAEvaluation.score_answers)."""
        device = prompts[0].device
        batch = {k: v.to(device) for k, v in prompt_batch(prompts, pad_token_id(self.tokenizer)).items()}
        return self.answer({"images": images, **batch})


def load_processor(path: str) -> ProcessorMixin:
    """The processor in a local folder; its tokenizer carries the chat template (the processor's, if the
    tokenizer has none), which the DataModule renders conversations with."""
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    processor.tokenizer.chat_template = processor.tokenizer.chat_template or processor.chat_template
    return processor


def load_model(path: str | None, config: dict[str, Any] | None, processor: ProcessorMixin) -> PreTrainedModel:
    """The checkpoint in a local folder, or the model of `config` at random with what it leaves out
    taken from the processor: the special token ids its config class takes and the text vocab_size."""
    if path is not None:
        return AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    config = dict(config)
    model_type = config.pop("model_type")
    accepted = inspect.signature(CONFIG_MAPPING[model_type].__init__).parameters
    for name, attributes in PROCESSOR_TOKEN_IDS.items():
        values = [getattr(processor, a) for a in attributes if getattr(processor, a, None) is not None]
        if name in accepted and name not in config and values:
            value = values[0]
            config[name] = (
                processor.tokenizer.convert_tokens_to_ids(value) if isinstance(value, str) else value
            )
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = {"vocab_size": len(processor.tokenizer), **config["text_config"]}
    return AutoModelForImageTextToText.from_config(AutoConfig.for_model(model_type, **config))
