"""The data path of transformers processor models (Qwen3-VL, ...): the conversation in the tokenizer's
chat template with each image as the processor's own image tokens, as many as the processor makes for
that image, and the image as the processor's pixel inputs (Qwen3-VL: patches and their grid)."""

from typing import Any

import torch
from PIL import Image
from transformers import ProcessorMixin

from stgc.data.records import Record
from stgc.data.templates import ChatTemplate

# one image's pixel inputs; Qwen3-VL's: pixel_values (patches, dim), image_grid_thw (1, 3)
PixelInputs = dict[str, torch.Tensor]
# the tokens around an image's, as the released checkpoints' chat templates write them, where the
# processor does not name them (Qwen3-VL's: vision_start_token, vision_end_token)
IMAGE_BRACKETS = {"Glm4vProcessor": ("<|begin_of_image|>", "<|end_of_image|>")}


def image_brackets(processor: ProcessorMixin) -> tuple[str, str]:
    """The text before and after an image's tokens ("" where a family writes none)."""
    named = IMAGE_BRACKETS.get(type(processor).__name__)
    if named is not None:
        return named
    return getattr(processor, "vision_start_token", ""), getattr(processor, "vision_end_token", "")


class ProcessorImages:
    """The image transform of a processor model: a PIL image becomes its image processor's pixel inputs
    (no augmentation: train and eval see the same); a text-only record has none."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, image: Image.Image) -> PixelInputs:
        return dict(self.image_processor(images=[image], return_tensors="pt"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.image_processor).__name__})"


class ProcessorTemplate(ChatTemplate):
    """ChatTemplate through the processor's tokenizer: the image placeholder becomes the processor's
    image text (Qwen3-VL: <|vision_start|><|image_pad|><|vision_end|>; GLM-4.5V:
    <|begin_of_image|><|image|><|end_of_image|>) with its image token repeated
    as often as the processor repeats it for the record's image, whose size is read from its header.
    `num_image_tokens` only estimates sequence lengths (group_by_length)."""

    def __init__(
        self, processor: ProcessorMixin, num_image_tokens: int, system_prompt: str | None = None
    ) -> None:
        super().__init__(processor.tokenizer, num_image_tokens, system_prompt)
        self.processor = processor
        self.image_token_id = processor.image_token_id
        start, end = image_brackets(processor)
        text = f"{start}{processor.image_token}{end}"
        self.image_text = self.text(text).ids  # the image's ids before its token is repeated
        if self.image_text.count(self.image_token_id) != 1:
            raise ValueError(
                f"the processor's image text {text!r} does not tokenize to one image token "
                f"({self.image_text}): is {processor.image_token!r} a special token of its tokenizer?"
            )

    def image_ids(self, record: Record) -> list[int]:
        """The image text's ids with the image token repeated once per token the processor makes."""
        try:
            with Image.open(record.image) as image:
                width, height = image.size  # the header only: the pixels are decoded with the sample
        except OSError as err:
            raise record.error("bad_image", f"cannot read {record.image}: {err}") from err
        counts = self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])  # vLLM's API
        count = counts["num_image_tokens"][0]
        at = self.image_text.index(self.image_token_id)
        return [*self.image_text[:at], *[self.image_token_id] * count, *self.image_text[at + 1 :]]


def concat_pixel_inputs(images: list[PixelInputs | None]) -> PixelInputs:
    """The pixel inputs of a batch's images, as the model takes them: each key's tensors concatenated
    in row order (Qwen3-VL: pixel_values (sum of patches, dim), image_grid_thw (images, 3)); rows without
    an image (None) add nothing, and a batch without images has no pixel inputs."""
    present = [image for image in images if image is not None]
    return {key: torch.cat([image[key] for image in present]) for key in (present[0] if present else {})}
