"""Shared steps of preparing a bundled dataset: atomic JSON writes, the tokenizer trained on its text,
and the FORMAT stamp that marks a complete build."""

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from stgc.constants import IMAGE_PLACEHOLDER
from stgc.data.templates import DEFAULT_SYSTEM_PROMPT

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
VOCAB_SIZE = 512  # stgc-vit-tiny's CLIP text vocab, which stage 0 needs to hold every id (easy-vqa merges fully at 435)


def write_json(path: Path, data: list[dict]) -> None:
    """Write atomically, so a present file is always a complete one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def conversation_texts(records: Iterable[dict]) -> list[str]:
    """What a tokenizer must cover for LLaVA records: the template's fixed pieces, then every turn
    as the templates tokenize it (a leading space, no <image> placeholder)."""
    texts = [DEFAULT_SYSTEM_PROMPT, " USER: ", " ASSISTANT:"]
    for record in records:
        texts += [
            " " + turn["value"].replace(IMAGE_PLACEHOLDER, "").strip() for turn in record["conversations"]
        ]
    return texts


def train_tokenizer(texts: list[str], out_dir: Path) -> int:
    """Train a byte-level BPE on `texts`, save it as a transformers tokenizer directory; return its vocab size."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS).save_pretrained(out_dir)
    return tokenizer.get_vocab_size()


def is_built(out_dir: Path, stamp: str, outputs: list[Path]) -> bool:
    """Whether out_dir holds a complete build: its FORMAT file reads `stamp`, and every output and the
    tokenizer are present."""
    format_file = out_dir / "FORMAT"
    tokenizer = [out_dir / "tokenizer" / name for name in ("tokenizer.json", "tokenizer_config.json")]
    return (
        format_file.is_file()
        and format_file.read_text().strip() == stamp
        and all(path.is_file() for path in [*outputs, *tokenizer])
    )


def seal(out_dir: Path, stamp: str, records: list[dict]) -> int:
    """Train out_dir/tokenizer on the records' text, then stamp the build (last: only a complete build
    is marked current); return the tokenizer's vocab size."""
    vocab_size = train_tokenizer(conversation_texts(records), out_dir / "tokenizer")
    (out_dir / "FORMAT").write_text(stamp + "\n")
    return vocab_size
