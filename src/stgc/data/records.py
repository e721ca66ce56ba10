"""Reading and validating LLaVA-format JSON files (a list of records with image + conversations)."""

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

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


def parse_record(raw: dict, source: str | Path, image_folder: str | Path) -> Record:
    """Validate one raw JSON record and turn it into a Record; raise RecordError naming file and id."""
    record_id = str(raw.get("id", "<no id>")) if isinstance(raw, dict) else "<not an object>"

    def fail(reason: str, detail: str) -> RecordError:
        return RecordError(source, record_id, reason, detail)

    conversations = raw.get("conversations") if isinstance(raw, dict) else None
    if not isinstance(conversations, list) or not conversations:
        raise fail("no_conversations", "has no 'conversations' list")
    roles = [turn.get("from") if isinstance(turn, dict) else None for turn in conversations]
    if unknown := sorted({str(r) for r in roles} - {"human", "gpt"}):
        raise fail("unknown_role", f"unknown role(s) {unknown}; expected 'human' or 'gpt'")
    expected = ["human", "gpt"] * (len(roles) // 2)
    if roles != expected:
        raise fail("not_alternating", f"roles {roles} do not alternate human/gpt starting with human")
    values = [turn.get("value") for turn in conversations]
    if not all(isinstance(v, str) for v in values):
        raise fail("bad_value", "a turn's 'value' is not a string")

    image = raw.get("image")
    n_placeholders = [v.count(IMAGE_PLACEHOLDER) for v in values]
    wanted = [1 if image else 0] + [0] * (len(values) - 1)
    if n_placeholders != wanted:
        raise fail(
            "bad_placeholder", f"{IMAGE_PLACEHOLDER!r} counts per turn {n_placeholders}, expected {wanted}"
        )
    image_path = None
    if image:
        image_path = Path(image_folder) / image
        if not image_path.is_file():
            raise fail("missing_image", f"image file {image_path} not found")

    turns = tuple(
        Turn(q["value"], a["value"], a.get("type", DEFAULT_QUESTION_TYPE))
        for q, a in zip(conversations[::2], conversations[1::2], strict=True)
    )
    return Record(record_id, image_path, turns, str(source))


def load_records(
    json_path: str | Path,
    image_folder: str | Path,
    skip_bad_records: bool = True,
    limit_records: int | None = None,
) -> tuple[list[Record], Counter[str]]:
    """Load a LLaVA JSON file: valid records, and skip counts per reason (bad ones raise unless skipped)."""
    with open(json_path) as f:
        raw = json.load(f)
    if not isinstance(raw, list):
        raise ValueError(f"{json_path}: expected a JSON list of records, got {type(raw).__name__}")
    raw = raw[:limit_records]
    records, skipped = [], Counter()
    for item in raw:
        try:
            records.append(parse_record(item, json_path, image_folder))
        except RecordError as err:
            if not skip_bad_records:
                raise
            skipped[err.reason] += 1
    if skipped:
        rank_zero_warn(f"{json_path}: skipped {skipped.total()} of {len(raw)} records: {dict(skipped)}")
    return records, skipped
