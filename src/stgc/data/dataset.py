"""A map-style dataset over validated records: encodes lazily and loads images with PIL."""

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import Dataset

from stgc.data.processor import PixelInputs, ProcessorImages
from stgc.data.records import Record, RecordError
from stgc.data.sampler import PADDING_INDEX
from stgc.data.templates import Template

# PIL image -> (3, H, W), or a processor model's pixel inputs (stgc.data.processor.ProcessorImages)
ImageTransform = Callable[[Image.Image], torch.Tensor | PixelInputs]
ANSWER_MODES = ("none", "all", "each")


class LlavaDataset(Dataset):
    """A map-style dataset of encoded records. For instruction templates, `answers` says what a sample
    carries besides the whole trained conversation:

    - "none" (training): nothing more;
    - "all" (validation, test): the texts and types of its answers, for teacher-forced VQA scoring;
    - "each" (predict): one sample per answer, the prompt up to that answer's " ASSISTANT:" and
      its text and type, for generation.

    A record that fails when loaded (undecodable pixels, too long, nothing trained after truncation)
    raises RecordError, or with skip_bad_records gives a {"skipped": (record key, reason)} item that the
    collate drops and reports in the batch (so counts are exact with DataLoader workers too).
    `load_skipped` holds the counts of records already refused when the file was read.
    """

    def __init__(
        self,
        records: Sequence[Record],
        template: Template,
        image_transform: ImageTransform,
        max_length: int,
        answers: str = "none",
        skip_bad_records: bool = True,
        load_skipped: Counter[str] | None = None,
    ) -> None:
        self.records = records
        self.template = template
        self.image_transform = image_transform
        self.max_length = max_length
        if answers not in ANSWER_MODES:
            raise ValueError(f"answers={answers!r} must be one of {ANSWER_MODES}")
        self.answers = answers if template.expands_turns else "none"
        self.skip_bad_records = skip_bad_records
        self.load_skipped = Counter(load_skipped)
        # (record index, answer index or None for the whole conversation)
        self.index: list[tuple[int, int | None]] = [
            (r, t)
            for r, rec in enumerate(records)
            for t in (range(len(rec.turns)) if self.answers == "each" else [None])
        ]
        self._blank: torch.Tensor | None = None
        self._warned = False  # about a skipped record
        self._warned_cut = False  # about answers cut by max_length

    def __len__(self) -> int:
        return len(self.index)

    @property
    def lengths(self) -> list[int]:
        """Approximate token count of each sample, as LLaVA estimates it: words plus image tokens."""
        lengths = []
        for record_idx, turn in self.index:
            record = self.records[record_idx]
            turns = record.turns if turn is None else record.turns[: turn + 1]
            words = sum(len(t.question.split()) + len(t.answer.split()) for t in turns)
            lengths.append(words + (self.template.num_image_tokens if record.image else 0))
        return lengths

    def __getitem__(self, idx: int) -> dict[str, Any]:
        """Encoded sample with its image tensor, or a "skipped" item for a bad record in skip mode
        (an empty one for the sampler's PADDING_INDEX)."""
        if idx == PADDING_INDEX:
            return {"skipped": None}
        record_idx, turn = self.index[idx]
        record = self.records[record_idx]
        try:
            encoded = self.template.encode(record, self.max_length, turn)
            image = self.load_image(record)
        except RecordError as err:
            if not self.skip_bad_records:
                raise
            if not self._warned:
                rank_zero_warn(f"{err}; skipping it, and reporting further skips in the batches")
                self._warned = True
            return {"skipped": (record.key, err.reason)}
        item = {
            "key": record.key,  # (id, occurrence): unique, where ids repeat
            "index": idx,  # the sample's position in this dataset
            "image": image,  # (3, H, W), or pixel inputs (None for a text-only record)
            "input_ids": torch.tensor(encoded.input_ids),  # (L,)
            "labels": torch.tensor(encoded.labels),  # (L,)
        }
        if turn is not None:
            answered = record.turns[turn]
            item["prompt_ids"] = item["input_ids"][: encoded.prompt_length]  # (P,)
            item["turn"] = turn
            item["question"] = answered.question
            item["answer"] = answered.answer
            item["question_type"] = answered.question_type
        elif self.answers == "all":
            complete = encoded.labels.count(self.template.tokenizer.eos_token_id)  # each answer ends with it
            if complete < len(record.turns) and not self._warned_cut:
                cut = len(record.turns) - complete
                detail = f"max_length={self.max_length} cuts {cut} of its {len(record.turns)} answers, which are not scored"
                rank_zero_warn(str(record.error("answers_cut", detail)))
                self._warned_cut = True
            item["answers"] = [t.answer for t in record.turns[:complete]]
            item["question_types"] = [t.question_type for t in record.turns[:complete]]
        return item

    def load_image(self, record: Record) -> torch.Tensor | PixelInputs | None:
        """Transformed RGB image, or for a text-only record zeros of the transform's output shape
        (no pixel inputs for a processor model)."""
        if record.image is None and isinstance(self.image_transform, ProcessorImages):
            return None
        if record.image is None:
            if self._blank is None:
                height, width = output_size(self.image_transform)
                self._blank = torch.zeros_like(self.image_transform(Image.new("RGB", (width, height))))
            return self._blank
        try:
            with Image.open(record.image) as img:
                return self.image_transform(img.convert("RGB"))
        except OSError as err:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise record.error("bad_image", f"cannot decode {record.image}: {err}") from err


def output_size(transform: ImageTransform) -> tuple[int, int]:
    """(H, W) of every image a torchvision-style transform (open_clip's) gives: the `size` of its last
    resize or crop step. A text-only record's blank image has it, so it batches with the others."""
    steps = getattr(transform, "transforms", [transform])  # a Compose, or a single step
    sizes = [step.size for step in steps if isinstance(getattr(step, "size", None), int | Sequence)]
    if not sizes:
        raise ValueError(
            f"image transform {transform!r} has no resize or crop step with a `size`: a text-only "
            "record needs one to know the size of its blank image"
        )
    size = sizes[-1]
    return (size, size) if isinstance(size, int) else (size[0], size[-1])
