"""Reading and validating LLaVA-format JSON files (a list of records with image + conversations)."""

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from stgc.constants import IMAGE_PLACEHOLDER

DEFAULT_QUESTION_TYPE = "other"  # a gpt turn without a "type" key


class RecordError(ValueError):
    """A record that cannot be used; `reason` is the key it is counted under in skip mode."""

    def __init__(self, source: str | Path, record_id: str, reason: str, detail: str) -> None:
        super().__init__(f"{source}: record {record_id!r}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Turn:
    """One question/answer exchange; question_type labels the answer for per-type eval metrics."""

    question: str
    answer: str
    question_type: str = DEFAULT_QUESTION_TYPE


@dataclass(frozen=True)
class Record:
    """A validated conversation; image is an absolute path, or None for a text-only record."""

    id: str
    image: Path | None
    turns: tuple[Turn, ...]
    source: str  # the JSON file it came from, for error messages


def parse_record(raw: Any, source: str | Path, image_folder: str | Path, index: int = 0) -> Record:
    """Validate one raw JSON record and turn it into a Record; raise RecordError naming file and id.

    A record without a usable id is named by its position ("#<index>"). The image must lie inside
    image_folder and its header must decode (pixel data is checked when the dataset loads it).
    """
    if not isinstance(raw, dict):
        raise RecordError(source, f"#{index}", "not_an_object", f"is a {type(raw).__name__}, not an object")
    record_id = raw.get("id", f"#{index}")
    if not isinstance(record_id, str | int) or isinstance(record_id, bool):
        detail = f"'id' is {record_id!r}, expected a string"
        raise RecordError(source, f"#{index}", "bad_id", detail)

    def fail(reason: str, detail: str) -> RecordError:
        return RecordError(source, str(record_id), reason, detail)

    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise fail("no_conversations", "has no 'conversations' list")
    if not all(isinstance(turn, dict) for turn in conversations):
        raise fail("bad_turn", "a conversation turn is not an object")
    roles = [turn.get("from") for turn in conversations]
    if unknown := sorted({str(r) for r in roles} - {"human", "gpt"}):
        raise fail("unknown_role", f"unknown role(s) {unknown}; expected 'human' or 'gpt'")
    expected = ["human", "gpt"] * (len(roles) // 2)
    if roles != expected:
        raise fail("not_alternating", f"roles {roles} do not alternate human/gpt starting with human")
    values = [turn.get("value") for turn in conversations]
    if not all(isinstance(v, str) for v in values):
        raise fail("bad_value", "a turn's 'value' is not a string")
    types = [turn.get("type", DEFAULT_QUESTION_TYPE) for turn in conversations[1::2]]
    if not all(isinstance(t, str) for t in types):
        raise fail("bad_value", "an answer's 'type' is not a string")

    image = raw.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise fail("bad_image_path", f"'image' is {image!r}, expected a relative file path")
    n_placeholders = [v.count(IMAGE_PLACEHOLDER) for v in values]
    wanted = [1 if image else 0] + [0] * (len(values) - 1)
    if n_placeholders != wanted:
        raise fail(
            "bad_placeholder", f"{IMAGE_PLACEHOLDER!r} counts per turn {n_placeholders}, expected {wanted}"
        )
    image_path = _image_path(image, image_folder, fail) if image else None
    turns = tuple(
        Turn(q["value"], a["value"], question_type)
        for q, a, question_type in zip(conversations[::2], conversations[1::2], types, strict=True)
    )
    return Record(str(record_id), image_path, turns, str(source))


def _image_path(image: str, image_folder: str | Path, fail: Callable[[str, str], RecordError]) -> Path:
    """The image's path, refused if it leaves image_folder, is missing, or is not a decodable image."""
    folder = Path(image_folder).absolute()
    path = Path(os.path.normpath(folder / image))  # lexical: symlinked data stays usable
    if not path.is_relative_to(folder):
        raise fail("image_outside_folder", f"image {image!r} resolves outside the image folder {folder}")
    if not path.is_file():
        raise fail("missing_image", f"image file {path} not found")
    try:
        with Image.open(path):  # reads the header only: cheap, catches empty and non-image files
            pass
    except OSError as err:
        raise fail("bad_image", f"cannot decode {path}: {err}") from err
    return path


def load_records(
    json_path: str | Path,
    image_folder: str | Path,
    skip_bad_records: bool = True,
    limit_records: int | None = None,
) -> tuple[list[Record], Counter[str]]:
    """Load a LLaVA JSON file: valid records, and skip counts per reason (bad ones raise unless skipped).

    A repeated id is a bad record too (predictions and error messages are keyed by id).
    """
    try:
        with open(json_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{json_path}: not valid JSON ({err})") from err
    if not isinstance(raw, list):
        raise ValueError(f"{json_path}: expected a JSON list of records, got {type(raw).__name__}")
    raw = raw[:limit_records]
    records, skipped, seen = [], Counter(), set()
    for index, item in enumerate(raw):
        try:
            record = parse_record(item, json_path, image_folder, index)
            if record.id in seen:
                raise RecordError(json_path, record.id, "duplicate_id", "repeats an earlier record's id")
            seen.add(record.id)
            records.append(record)
        except RecordError as err:
            if not skip_bad_records:
                raise
            skipped[err.reason] += 1
    if skipped:
        rank_zero_warn(f"{json_path}: skipped {skipped.total()} of {len(raw)} records: {dict(skipped)}")
    return records, skipped
