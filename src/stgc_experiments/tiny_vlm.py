"""An offline tiny Qwen3-VL processor (the processor of qwen3_vl_moe) for configs/vlm/qwen3_vl_moe_tiny.yaml:
a word-level tokenizer built here with Qwen's special tokens and ChatML, and Qwen's image and video
processors at a few patches. scripts/prepare_tiny_vlm.py writes it over easy-vqa's words (make data-vlm)."""

import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor, Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

CHATML = (  # Qwen1.5-Chat's template (ChatML), as in its tokenizer_config.json
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PAD, END_OF_TURN = "<|endoftext|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, "<|im_start|>", END_OF_TURN, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                  "<|video_pad|>"]  # fmt: skip
CHATML_WORDS = "system user assistant You are a helpful assistant ."  # what the template writes itself
PATCH, MERGE = 16, 2  # Qwen3-VL's patch side and 2x2 merge: a token per 32x32 pixels
MIN_PIXELS, MAX_PIXELS = 32 * 32, 64 * 64  # images resized to between 1 and 4 tokens


def word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over the words of `texts` (and ChatML's), with
    Qwen's special tokens, ChatML as its chat template and <|im_end|> as eos (the end of a turn)."""
    words = sorted({w for text in [CHATML_WORDS, *texts] for w in re.findall(r"\w+|[^\w\s]", text)})
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, "[UNK]", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token=PAD, eos_token=END_OF_TURN,
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )  # fmt: skip
    tokenizer.chat_template = CHATML
    return tokenizer


def qwen3_vl_processor(texts: Iterable[str]) -> Qwen3VLProcessor:
    """Qwen3-VL's processor over word_tokenizer(texts); its patch and merge sizes match moe_vlms.qwen3_vl_moe."""
    sizes = {"patch_size": PATCH, "temporal_patch_size": 2, "merge_size": MERGE}
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        tokenizer=word_tokenizer(texts),
        video_processor=Qwen3VLVideoProcessor(**sizes),
    )


def save_qwen3_vl_processor(llava_files: Iterable[Path], path: Path) -> Path:
    """qwen3_vl_processor over the conversations of LLaVA-format files, saved to `path` (a local folder
    that AutoProcessor.from_pretrained reads)."""
    texts = [turn["value"] for file in llava_files for record in json.loads(Path(file).read_text())
             for turn in record["conversations"]]  # fmt: skip
    qwen3_vl_processor(texts).save_pretrained(path)
    return path
