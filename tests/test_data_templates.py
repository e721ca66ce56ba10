"""Templates: exact ids and labels, image-token expansion, truncation, one-answer eval samples."""

from pathlib import Path

import pytest

from stgc.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from stgc.data.records import Record, RecordError, Turn
from stgc.data.templates import DEFAULT_SYSTEM_PROMPT, InstructionTemplate, PlainTemplate

N_IMAGE = 4
RECORD = Record(
    "r1",
    Path("img.png"),
    (Turn("<image>\nwhat color is the shape?", "blue"), Turn("is there a circle?", "no")),
    "file.json",
)


def expected(tokenizer, segments: list[tuple[str | list[int], bool]]) -> tuple[list[int], list[int]]:
    """Ids and labels built independently: each text tokenized alone, ids given as lists kept as is."""
    ids, labels = [], []
    for piece, train in segments:
        piece_ids = (
            piece if isinstance(piece, list) else tokenizer(piece, add_special_tokens=False)["input_ids"]
        )
        ids += piece_ids
        labels += piece_ids if train else [IGNORE_INDEX] * len(piece_ids)
    return ids, labels


def test_plain_exact(easy_vqa_tokenizer):
    tok = easy_vqa_tokenizer
    encoded = PlainTemplate(tok, N_IMAGE).encode(RECORD, max_length=100)
    ids, labels = expected(
        tok, [([IMAGE_TOKEN_ID] * N_IMAGE, False), ("blue", True), ([tok.eos_token_id], True)]
    )
    assert (encoded.input_ids, encoded.labels, encoded.prompt_length) == (ids, labels, None)


def instruction_segments(tok, system: str = DEFAULT_SYSTEM_PROMPT) -> list:
    """The Vicuna-v1 segments of RECORD, every answer trained."""
    return [
        (f"{system} USER: ", False),
        ([IMAGE_TOKEN_ID] * N_IMAGE, False),
        ("\nwhat color is the shape? ASSISTANT:", False),
        (" blue", True),
        ([tok.eos_token_id], True),
        ("USER: is there a circle? ASSISTANT:", False),
        (" no", True),
        ([tok.eos_token_id], True),
    ]


def test_instruction_exact(easy_vqa_tokenizer):
    tok = easy_vqa_tokenizer
    encoded = InstructionTemplate(tok, N_IMAGE, system_prompt="Be brief.").encode(RECORD, max_length=500)
    assert (encoded.input_ids, encoded.labels) == expected(tok, instruction_segments(tok, "Be brief."))


def test_image_tokens_are_one_consecutive_run(easy_vqa_tokenizer):
    encoded = InstructionTemplate(easy_vqa_tokenizer, N_IMAGE).encode(RECORD, max_length=500)
    positions = [k for k, i in enumerate(encoded.input_ids) if i == IMAGE_TOKEN_ID]
    assert len(positions) == N_IMAGE and positions == list(range(positions[0], positions[0] + N_IMAGE))
    assert all(encoded.labels[k] == IGNORE_INDEX for k in positions)


def test_text_only_record_has_no_image_ids(easy_vqa_tokenizer):
    record = Record("t", None, (Turn("hi", "hello"),), "file.json")
    for template in (PlainTemplate, InstructionTemplate):
        assert IMAGE_TOKEN_ID not in template(easy_vqa_tokenizer, N_IMAGE).encode(record, 500).input_ids


def test_eval_sample_trains_only_its_answer(easy_vqa_tokenizer):
    tok = easy_vqa_tokenizer
    encoded = InstructionTemplate(tok, N_IMAGE).encode(RECORD, max_length=500, turn=1)
    segments = instruction_segments(tok)
    segments[3:5] = [(" blue", False), ([tok.eos_token_id], False)]
    ids, labels = expected(tok, segments)
    assert (encoded.input_ids, encoded.labels) == (ids, labels)
    prompt, _ = expected(tok, segments[:-2])
    assert encoded.prompt_length == len(prompt)
    first = InstructionTemplate(tok, N_IMAGE).encode(RECORD, max_length=500, turn=0)
    assert first.input_ids == expected(tok, segments[:5])[0]


def test_truncation_cuts_the_end(easy_vqa_tokenizer):
    template = InstructionTemplate(easy_vqa_tokenizer, N_IMAGE)
    full = template.encode(RECORD, max_length=500)
    cut = template.encode(RECORD, max_length=len(full.input_ids) - 3)
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]


def test_truncation_never_cuts_image_tokens(easy_vqa_tokenizer):
    template = PlainTemplate(easy_vqa_tokenizer, N_IMAGE)
    with pytest.raises(RecordError, match=r"file.json: record 'r1': prefix through the image") as err:
        template.encode(RECORD, max_length=N_IMAGE - 1)
    assert err.value.reason == "too_long"


def test_all_labels_masked_after_truncation(easy_vqa_tokenizer):
    template = PlainTemplate(easy_vqa_tokenizer, N_IMAGE)
    with pytest.raises(RecordError, match=r"file.json: record 'r1': no trained token") as err:
        template.encode(RECORD, max_length=N_IMAGE)
    assert err.value.reason == "all_masked"
