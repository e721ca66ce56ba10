"""Offline tiny processors of transformers MoE VLMs for configs/vlm/*_tiny.yaml: a word-level tokenizer built
here with the family's special tokens and a chat template (ChatML; Llama 4's own), and the family's own
image and video processors at a few patches (Qwen3-VL-MoE: Qwen3VLProcessor; GLM-4.5V: Glm4vProcessor;
Llama 4: Llama4Processor at 56-pixel tiles; ERNIE-4.5-VL: Ernie4_5_VLMoeProcessor; Aria: AriaProcessor
at 4 tokens an image).
scripts/prepare_tiny_vlm.py writes them over easy-vqa's words (make data-vlm)."""

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AriaImageProcessor,
    AriaProcessor,
    Ernie4_5_VLMoeImageProcessor,
    Ernie4_5_VLMoeProcessor,
    Ernie4_5_VLMoeVideoProcessor,
    Glm4vImageProcessor,
    Glm4vProcessor,
    Glm4vVideoProcessor,
    Llama4ImageProcessor,
    Llama4Processor,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLImageProcessor,
    Qwen3VLProcessor,
)
from transformers.models.llama4.processing_llama4 import chat_template as LLAMA4_TEMPLATE
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

CHATML = (  # Qwen1.5-Chat's template (ChatML), as in its tokenizer_config.json
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PAD, END_OF_TURN = "<|endoftext|>", "<|im_end|>"
QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
GLM_TOKENS = ["<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
              "<|end_of_video|>"]  # fmt: skip
ERNIE_TOKENS = {"image_token": "<|IMAGE_PLACEHOLDER|>", "image_start_token": "<|IMAGE_START|>",
                "image_end_token": "<|IMAGE_END|>", "video_token": "<|VIDEO_PLACEHOLDER|>",
                "video_start_token": "<|VIDEO_START|>", "video_end_token": "<|VIDEO_END|>"}  # fmt: skip
LLAMA4_TOKENS = ["<|image|>", "<|image_start|>", "<|image_end|>", "<|patch|>", "<|tile_x_separator|>",
                 "<|tile_y_separator|>"]  # fmt: skip
ARIA_TOKENS = ["<fim_prefix>", "<fim_suffix>"]  # around Aria's image token, as its chat template writes it
ARIA_IMAGE = {"image_token": "<|img|>"}  # read off the tokenizer by name
PATCH, MERGE = 16, 2  # Qwen3-VL's patch side and 2x2 merge: a token per 32x32 pixels
MIN_PIXELS, MAX_PIXELS = 32 * 32, 64 * 64  # images resized to between 1 and 4 tokens
TILE = 56  # Llama 4's tile side: 4x4 patches of 14 pixels, 2x2 after its pixel shuffle, so 4 tokens a tile


@dataclass(frozen=True)
class ChatFormat:
    """A chat template with the special tokens it writes (pad first), its end of turn (the tokenizer's
    eos: where answers end), its begin-of-text token if it writes one, and the words it writes itself."""

    template: str
    tokens: tuple[str, ...]
    end_of_turn: str
    words: str
    bos: str | None = None


CHATML_FORMAT = ChatFormat(CHATML, (PAD, "<|im_start|>", END_OF_TURN), END_OF_TURN,
                           "system user assistant You are a helpful assistant .")  # fmt: skip
LLAMA4_FORMAT = ChatFormat(  # Llama 4's own template, as transformers' Llama4Processor ships it
    LLAMA4_TEMPLATE,
    ("<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>"),
    "<|eot|>", "system user assistant", bos="<|begin_of_text|>",
)  # fmt: skip


def word_tokenizer(
    texts: Iterable[str],
    image_tokens: list[str],
    chat: ChatFormat = CHATML_FORMAT,
    named: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over the words of `texts` (and the chat format's),
    with the format's and the family's image tokens as special tokens, the format's template as its chat
    template and its end of turn as eos; `named`: special tokens the family's processor reads off the
    tokenizer by name (ERNIE-4.5-VL's tokenizer.image_token, ...)."""
    words = sorted({w for text in [chat.words, *texts] for w in re.findall(r"\w+|[^\w\s]", text)})
    special = [*chat.tokens, *image_tokens, *(named or {}).values()]
    vocab = {token: i for i, token in enumerate([*special, "[UNK]", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token=special[0], eos_token=chat.end_of_turn,
        bos_token=chat.bos, additional_special_tokens=special[1:], **(named or {}),
    )  # fmt: skip
    tokenizer.chat_template = chat.template
    return tokenizer


def qwen3_vl_processor(texts: Iterable[str]) -> Qwen3VLProcessor:
    """Qwen3-VL's processor over word_tokenizer(texts); its patch and merge sizes match moe_vlms.qwen3_vl_moe."""
    sizes = {"patch_size": PATCH, "temporal_patch_size": 2, "merge_size": MERGE}
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        tokenizer=word_tokenizer(texts, QWEN_TOKENS),
        video_processor=Qwen3VLVideoProcessor(**sizes),
    )


def glm4v_processor(texts: Iterable[str]) -> Glm4vProcessor:
    """GLM-4.5V's processor (Glm4vProcessor) over word_tokenizer(texts): 14-pixel patches, 2x2 merge,
    images resized to between 1 and 4 tokens."""
    size = {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}
    return Glm4vProcessor(
        image_processor=Glm4vImageProcessor(size=size),
        tokenizer=word_tokenizer(texts, GLM_TOKENS),
        video_processor=Glm4vVideoProcessor(),
    )


def llama4_processor(texts: Iterable[str]) -> Llama4Processor:
    """Llama 4's processor (Llama4Processor) over word_tokenizer(texts) in Llama 4's chat format: images
    tiled at TILE pixels, up to 4 tiles plus the global one; its sizes match moe_vlms.llama4."""
    return Llama4Processor(
        image_processor=Llama4ImageProcessor(size={"height": TILE, "width": TILE}, max_patches=4),
        tokenizer=word_tokenizer(texts, LLAMA4_TOKENS, LLAMA4_FORMAT),
        patch_size=14,
        pixel_shuffle_ratio=0.5,
    )


def ernie4_5_vl_moe_processor(texts: Iterable[str]) -> Ernie4_5_VLMoeProcessor:
    """ERNIE-4.5-VL's processor (Ernie4_5_VLMoeProcessor) over word_tokenizer(texts) with its named image
    and video tokens, in ChatML (ERNIE's own template ships with its checkpoints, not with transformers):
    14-pixel patches, 2x2 merge, images resized to between 1 and 4 tokens; its video processor draws no
    timestamps (which would need a font file)."""
    size = {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}
    return Ernie4_5_VLMoeProcessor(
        image_processor=Ernie4_5_VLMoeImageProcessor(size=size),
        tokenizer=word_tokenizer(texts, [], named=ERNIE_TOKENS),
        video_processor=Ernie4_5_VLMoeVideoProcessor(draw_on_frames=False),
    )


def aria_processor(texts: Iterable[str]) -> AriaProcessor:
    """Aria's processor (AriaProcessor) over word_tokenizer(texts) with its named image token, in ChatML
    (Aria's own template ships with its checkpoints, not with transformers): each image one crop at its
    processor's size (980 pixels, padded; the pixel mask marks the image) of 4 tokens (size_conversion),
    the projector's queries in configs/vlm/aria_tiny.yaml."""
    return AriaProcessor(
        image_processor=AriaImageProcessor(),
        tokenizer=word_tokenizer(texts, ARIA_TOKENS, named=ARIA_IMAGE),
        size_conversion={980: 4},
    )


PROCESSORS = {
    "qwen3_vl_moe": qwen3_vl_processor,
    "glm4v_moe": glm4v_processor,
    "llama4": llama4_processor,
    "ernie4_5_vl_moe": ernie4_5_vl_moe_processor,
    "aria": aria_processor,
}


def save_processor(family: str, llava_files: Iterable[Path], path: Path) -> Path:
    """The family's tiny processor over the conversations of LLaVA-format files, saved to `path` (a local
    folder that AutoProcessor.from_pretrained reads)."""
    texts = [turn["value"] for file in llava_files for record in json.loads(Path(file).read_text())
             for turn in record["conversations"]]  # fmt: skip
    processor: ProcessorMixin = PROCESSORS[family](texts)
    processor.save_pretrained(path)
    return path
