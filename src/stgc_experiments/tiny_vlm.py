"""Offline tiny processors of transformers MoE VLMs for configs/vlm/*_tiny.yaml: a word-level tokenizer built
here with the family's special tokens and ChatML, and the family's own image and video processors at a few
patches (Qwen3-VL-MoE: Qwen3VLProcessor; GLM-4.5V: Glm4vProcessor). scripts/prepare_tiny_vlm.py writes
them over easy-vqa's words (make data-vlm)."""

import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Glm4vImageProcessor,
    Glm4vProcessor,
    Glm4vVideoProcessor,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLImageProcessor,
    Qwen3VLProcessor,
)
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

CHATML = (  # Qwen1.5-Chat's template (ChatML), as in its tokenizer_config.json
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PAD, END_OF_TURN = "<|endoftext|>", "<|im_end|>"
CHATML_TOKENS = [PAD, "<|im_start|>", END_OF_TURN]
QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
GLM_TOKENS = ["<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
              "<|end_of_video|>"]  # fmt: skip
CHATML_WORDS = "system user assistant You are a helpful assistant ."  # what the template writes itself
PATCH, MERGE = 16, 2  # Qwen3-VL's patch side and 2x2 merge: a token per 32x32 pixels
MIN_PIXELS, MAX_PIXELS = 32 * 32, 64 * 64  # images resized to between 1 and 4 tokens


def word_tokenizer(texts: Iterable[str], image_tokens: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over the words of `texts` (and ChatML's), with
    ChatML's and the family's image tokens as special tokens, ChatML as its chat template and <|im_end|>
    as eos (the end of a turn)."""
    words = sorted({w for text in [CHATML_WORDS, *texts] for w in re.findall(r"\w+|[^\w\s]", text)})
    special = [*CHATML_TOKENS, *image_tokens]
    vocab = {token: i for i, token in enumerate([*special, "[UNK]", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token=PAD, eos_token=END_OF_TURN,
        additional_special_tokens=special[1:],
    )  # fmt: skip
    tokenizer.chat_template = CHATML
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


PROCESSORS = {"qwen3_vl_moe": qwen3_vl_processor, "glm4v_moe": glm4v_processor}


def save_processor(family: str, llava_files: Iterable[Path], path: Path) -> Path:
    """The family's tiny processor over the conversations of LLaVA-format files, saved to `path` (a local
    folder that AutoProcessor.from_pretrained reads)."""
    texts = [turn["value"] for file in llava_files for record in json.loads(Path(file).read_text())
             for turn in record["conversations"]]  # fmt: skip
    processor: ProcessorMixin = PROCESSORS[family](texts)
    processor.save_pretrained(path)
    return path
