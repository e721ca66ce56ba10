"""Reading and validating LLaVA-format JSON files (a list of records with image + conversations).

Ids may repeat (LLaVA's files reuse an image's id for its records from several sources): a record's
`occurrence` counts the records of its file with its id so far, and (id, occurrence) is its unique key.
"""

import json
import os
import re
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any, TextIO

from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from stgc.constants import IMAGE_PLACEHOLDER, OTHER_QUESTION_TYPE

CHUNK = 1 << 22  # characters of the file decoded at a time
WHITESPACE = re.compile(r"[ \t\n\r]*")
SHARED_LENGTH = 32  # texts up to this long are interned (see _shared)
NUMBER_GOES_ON = frozenset("0123456789.eE+-")  # after a number cut at the window's end ("4." of "4.5")


class RecordError(ValueError):
    """A record that cannot be used; `reason` is the key it is counted under in skip mode."""

    def __init__(
        self, source: str | Path, record_id: str, reason: str, detail: str, occurrence: int = 1
    ) -> None:
        repeat = f" (occurrence {occurrence})" if occurrence > 1 else ""
        super().__init__(f"{source}: record {record_id!r}{repeat}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Turn:
    """One question/answer exchange; question_type labels the answer for per-type eval metrics."""

    question: str
    answer: str
    question_type: str = OTHER_QUESTION_TYPE


@dataclass(frozen=True, slots=True)
class Record:
    """A validated conversation; image is an absolute path (a str: a Path costs 500 bytes, 0.2 GB
    for LLaVA-mix665k's images), or None for a text-only record."""

    id: str
    image: str | None
    turns: tuple[Turn, ...]
    source: str  # the JSON file it came from, for error messages
    occurrence: int = 1  # the n-th record of its file with this id

    @property
    def key(self) -> tuple[str, int]:
        """(id, occurrence): unique within the file, whether or not its ids repeat."""
        return self.id, self.occurrence

    def error(self, reason: str, detail: str) -> RecordError:
        """A RecordError naming this record's file, id and (when repeated) occurrence."""
        return RecordError(self.source, self.id, reason, detail, self.occurrence)


class ImageFolder:
    """Resolves records' image paths inside `folder` and checks each distinct path once."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = str(Path(folder).absolute())
        self._checked: dict[str, str | tuple[str, str]] = {}  # image -> path, or (reason, detail)

    def check(self, image: str) -> str | tuple[str, str]:
        """The image's absolute path, or (reason, detail) if it leaves the folder, is missing, or is not
        a decodable image."""
        if (checked := self._checked.get(image)) is None:
            checked = self._checked[image] = self._check(image)
        return checked

    def _check(self, image: str) -> str | tuple[str, str]:
        path = os.path.normpath(os.path.join(self.folder, image))  # lexical: symlinked data stays usable
        if path != self.folder and not path.startswith(self.folder + os.sep):
            return "image_outside_folder", f"image {image!r} resolves outside the image folder {self.folder}"
        if not os.path.isfile(path):
            return "missing_image", f"image file {path} not found"
        try:
            if not _has_image_signature(path):
                with Image.open(path):  # no signature known (TGA has none): Pillow tries every format
                    pass
        except OSError as err:
            return "bad_image", f"cannot decode {path}: {err}"
        return path


def _has_image_signature(path: str) -> bool:
    """Whether the file starts with the magic bytes of a format Pillow reads, told as Image.open tells
    them (the first 16 bytes; the format its extension names is asked first): empty and text files
    fail. Parsing the header too (a JPEG's markers) would cost 15 times as much per image; a file that
    starts well but does not decode is found when its sample is built (`bad_image`)."""
    with open(path, "rb") as f:
        prefix = f.read(16)
    Image.init()  # every format plugin registered (once)
    named = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    formats = [Image.OPEN[named]] if named in Image.OPEN else []
    return any(_accepts(accept, prefix) for _, accept in chain(formats, Image.OPEN.values()))


def _accepts(accept: Callable[[bytes], Any] | None, prefix: bytes) -> bool:
    """Whether a format's signature test takes the prefix; its errors count as no, as in Image.open."""
    try:
        return accept is not None and accept(prefix) is True
    except (SyntaxError, IndexError, TypeError, struct.error):
        return False


def _shared(text: str) -> str:
    """Short texts repeat across a big file ("yes", "2", "white": VQA answers): one object for each."""
    return sys.intern(text) if len(text) <= SHARED_LENGTH else text


def record_id(raw: Any, source: str | Path, index: int) -> str:
    """A raw record's id as a string ("#<index>" when it has none); RecordError if it is not a record
    or its id is not a string or number."""
    if not isinstance(raw, dict):
        raise RecordError(source, f"#{index}", "not_an_object", f"is a {type(raw).__name__}, not an object")
    value = raw.get("id", f"#{index}")
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise RecordError(source, f"#{index}", "bad_id", f"'id' is {value!r}, expected a string")
    return str(value)


def parse_record(
    raw: Any, source: str | Path, image_folder: str | Path | ImageFolder, index: int = 0, occurrence: int = 1
) -> Record:
    """Validate one raw JSON record and turn it into a Record; raise RecordError naming file and id.

    A record without a usable id is named by its position ("#<index>"). The image must lie inside
    image_folder and its header must decode (pixel data is checked when the dataset loads it).
    """
    rid = record_id(raw, source, index)

    def fail(reason: str, detail: str) -> RecordError:
        return RecordError(source, rid, reason, detail, occurrence)

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
    types = [turn.get("type", OTHER_QUESTION_TYPE) for turn in conversations[1::2]]
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
    image_path = None
    if image:
        folder = image_folder if isinstance(image_folder, ImageFolder) else ImageFolder(image_folder)
        image_path = folder.check(image)
        if isinstance(image_path, tuple):
            raise fail(*image_path)
    values = [_shared(value) for value in values]
    turns = tuple(
        Turn(question, answer, _shared(question_type))
        for question, answer, question_type in zip(values[::2], values[1::2], types, strict=True)
    )
    return Record(rid, image_path, turns, str(source), occurrence)


class JSONList:
    """The elements of a file's top-level JSON list, decoded one at a time from a window of its text:
    neither the whole text nor every decoded object is held at once (a 0.6 GB file decodes to several
    GB of dicts). Errors name the file and the character where the JSON goes wrong."""

    def __init__(self, f: TextIO, name: str | Path) -> None:
        self.f = f
        self.name = name
        self.decoder = json.JSONDecoder()
        self.buffer = ""  # the window
        self.pos = 0  # the next character to read in it
        self.offset = 0  # characters of the file before the window

    def _more(self) -> bool:
        """Append the next chunk of the file to the window, dropping what was read; False at its end."""
        try:
            chunk = self.f.read(CHUNK)
        except UnicodeDecodeError as err:
            raise ValueError(f"{self.name}: not valid JSON ({err})") from err
        if chunk:
            self.buffer, self.offset, self.pos = self.buffer[self.pos :] + chunk, self.offset + self.pos, 0
        return bool(chunk)

    def _peek(self) -> str:
        """The next character that is not whitespace ("" at the end of the file), not consumed."""
        while True:
            self.pos = WHITESPACE.match(self.buffer, self.pos).end()
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if not self._more():
                return ""

    def _invalid(self, message: str, at: int) -> ValueError:
        return ValueError(f"{self.name}: not valid JSON ({message} at character {self.offset + at})")

    def _value(self) -> Any:
        """Decode the next value. A number cut by the window's end decodes too ("4" of "4.5"): a value not
        followed by a character that ends a number is decoded again with more of the file."""
        self._peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError as err:
                if not self._more():
                    raise self._invalid(err.msg, err.pos) from err
                continue
            if (end < len(self.buffer) and self.buffer[end] not in NUMBER_GOES_ON) or not self._more():
                self.pos = end
                return value

    def __iter__(self) -> Iterator[Any]:
        if self._peek() != "[":
            raise ValueError(
                f"{self.name}: expected a JSON list of records, got {type(self._value()).__name__}"
            )
        self.pos += 1
        if self._peek() == "]":
            self.pos += 1
        else:
            while True:
                yield self._value()
                separator = self._peek()
                if separator not in (",", "]"):
                    found = separator or "the end of the file"
                    raise self._invalid(f"expected ',' or ']', found {found!r}", self.pos)
                self.pos += 1
                if separator == "]":
                    break
        if self._peek():
            raise self._invalid("extra data after the list", self.pos)


def load_records(
    json_path: str | Path,
    image_folder: str | Path,
    skip_bad_records: bool = True,
    limit_records: int | None = None,
) -> tuple[list[Record], Counter[str]]:
    """Load a LLaVA JSON file: valid records, and skip counts per reason (bad ones raise unless skipped).

    Records that repeat an id are kept: each gets its occurrence (see Record.key). The file is decoded
    record by record, and each distinct image path is checked once.
    """
    source, folder = str(json_path), ImageFolder(image_folder)
    records, skipped, seen, n_read = [], Counter(), Counter(), 0
    with open(json_path, encoding="utf-8") as f:
        for index, raw in enumerate(islice(JSONList(f, json_path), limit_records)):
            n_read += 1
            try:
                rid = record_id(raw, source, index)
                seen[rid] += 1
                records.append(parse_record(raw, source, folder, index, seen[rid]))
            except RecordError as err:
                if not skip_bad_records:
                    raise
                skipped[err.reason] += 1
    if skipped:
        rank_zero_warn(f"{json_path}: skipped {skipped.total()} of {n_read} records: {dict(skipped)}")
    return records, skipped
