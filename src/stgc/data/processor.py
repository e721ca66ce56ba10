"""The data path of transformers processor models (Qwen3-VL, GLM-4.5V, Llama 4, ...): the conversation in
the tokenizer's chat template with each image as the ids the processor itself writes for that image (its
image tokens, as many as it makes; Llama 4's tiles and their separators), and the image as the processor's
pixel inputs (Qwen3-VL: patches and their grid; Llama 4: its tiles; Aria: its crops and their pixel mask)."""

from typing import Any

import torch
from PIL import Image
from transformers import ProcessorMixin

from stgc.data.records import Record
from stgc.data.templates import ChatTemplate

# one image's pixel inputs; Qwen3-VL's: pixel_values (patches, dim), image_grid_thw (1, 3); Llama 4's:
# pixel_values (tiles, 3, side, side); Aria's: pixel_values (crops, 3, side, side) and the image's pixels
# among them, pixel_mask (crops, side, side)
PixelInputs = dict[str, torch.Tensor]
# the tokens around an image's, as the released checkpoints' chat templates write them, where the
# processor does not name them (Qwen3-VL's: vision_start_token, vision_end_token; ERNIE-4.5-VL's:
# image_start_token, image_end_token; Llama 4's processor writes its own)
IMAGE_BRACKETS = {
    "Glm4vProcessor": ("<|begin_of_image|>", "<|end_of_image|>"),
    "AriaProcessor": ("<fim_prefix>", "<fim_suffix>"),
}
BRACKET_NAMES = (("vision_start_token", "vision_end_token"), ("image_start_token", "image_end_token"))


def image_brackets(processor: ProcessorMixin) -> tuple[str, str]:
    """The text before and after an image's tokens ("" where a family writes none)."""
    named = IMAGE_BRACKETS.get(type(processor).__name__)
    if named is not None:
        return named
    for start, end in BRACKET_NAMES:
        if hasattr(processor, start):
            return getattr(processor, start), getattr(processor, end)
    return "", ""


def image_text_ids(processor: ProcessorMixin, width: int, height: int) -> list[int]:
    """The ids the processor writes for an image of this size, brackets included: its own expansion of
    its image token, which depends on the size alone, run on a blank image of that size."""
    start, end = image_brackets(processor)
    text = [f"{start}{processor.image_token}{end}"]
    blank = Image.new("RGB", (width, height))
    return processor(text=text, images=[blank], add_special_tokens=False)["input_ids"][0]


class ProcessorImages:
    """The image transform of a processor model: a PIL image becomes the pixel inputs its image processor
    makes that the model takes (not the processor's `unused_input_names`: Llama 4's aspect ratios), the
    floating ones in float32 as other batch tensors (Llama 4's are bfloat16), which the trainer's precision
    then casts; no augmentation: train and eval see the same. A text-only record has none."""

    def __init__(self, processor: ProcessorMixin) -> None:
        self.image_processor: Any = processor.image_processor
        self.unused = set(processor.unused_input_names)

    def __call__(self, image: Image.Image) -> PixelInputs:
        inputs = self.image_processor(images=[image], return_tensors="pt")
        return {
            key: value.float() if value.is_floating_point() else value
            for key, value in inputs.items()
            if key not in self.unused
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.image_processor).__name__})"


class ProcessorTemplate(ChatTemplate):
    """ChatTemplate through the processor's tokenizer: the image placeholder becomes the ids the processor
    writes for the record's image (image_text_ids), whose size is read from its header; once per size.
    Qwen3-VL: <|vision_start|><|image_pad|>...<|vision_end|>; GLM-4.5V: <|begin_of_image|><|image|>...
    <|end_of_image|>; Llama 4: <|image_start|>, each tile's <|patch|> tokens with tile separators, then
    the global tile's <|image|><|patch|>..., <|image_end|>; Aria: <fim_prefix><|img|>...<fim_suffix>.
    `num_image_tokens` only estimates sequence lengths (group_by_length)."""

    def __init__(
        self, processor: ProcessorMixin, num_image_tokens: int, system_prompt: str | None = None
    ) -> None:
        super().__init__(processor.tokenizer, num_image_tokens, system_prompt)
        self.processor = processor
        self.sized_ids: dict[tuple[int, int], list[int]] = {}  # (width, height) -> image_text_ids

    def image_ids(self, record: Record) -> list[int]:
        """The ids the processor writes for the record's image."""
        try:
            with Image.open(record.image) as image:
                size = image.size  # the header only: the pixels are decoded with the sample
        except OSError as err:
            raise record.error("bad_image", f"cannot read {record.image}: {err}") from err
        if size not in self.sized_ids:
            self.sized_ids[size] = image_text_ids(self.processor, *size)
        return self.sized_ids[size]


def concat_pixel_inputs(images: list[PixelInputs | None]) -> PixelInputs:
    """The pixel inputs of a batch's images, as the model takes them: each key's tensors concatenated
    in row order (Qwen3-VL: pixel_values (sum of patches, dim), image_grid_thw (images, 3); Llama 4:
    pixel_values (sum of tiles, 3, side, side)); rows without an image (None) add nothing, and a batch
    without images has no pixel inputs."""
    present = [image for image in images if image is not None]
    return {key: torch.cat([image[key] for image in present]) for key in (present[0] if present else {})}
