"""Hostile LLaVA files end to end: strict mode names each problem (file and record); lenient mode
trains on exactly the good records and reports how many bad ones it skipped, and why."""

import io
import json
import re
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from stgc.data import InstructionDataModule
from stgc.data.records import RecordError, load_records
from stgc.module import LVLMModule
from support.tiny import TINY_LM

MAX_LENGTH = 160  # 64 image tokens + text


def turns(*values, roles=("human", "gpt")) -> list:
    return [{"from": roles[i % 2], "value": v} for i, v in enumerate(values)]


def good(record_id: str, image: str = "red.png", answer: str = "red") -> dict:
    return {"id": record_id, "image": image, "conversations": turns("<image>\nwhat color?", answer)}


GOOD = [
    good("g0"),
    good("g1", "gray.png"),  # grayscale
    good("g2", "rgba.png"),  # RGBA
    good("g3", "tiny.png"),  # 1x1
    good("g4", answer=""),  # an empty answer trains its end token only
    {"id": "g5", "conversations": turns("", "hello")},  # text only, empty question
    {"id": 6, "image": "sub/red.png", "conversations": turns("<image>\nq", "a")},  # int id, subfolder
    {"id": "g7", "image": "red.png", "conversations": turns("<image>\nq", "a", *["q", "a"] * 400)},  # cut
    {"id": "g0", "image": "red.png", "conversations": turns("<image>", "again")},  # a repeated id: kept
]

# (record, reason); ids name the record in errors, "#<index>" when it has none
BAD_AT_LOAD = [
    ("just a string", "not_an_object"),
    (None, "not_an_object"),
    ({"id": ["b"], "image": "red.png", "conversations": turns("<image>", "a")}, "bad_id"),
    ({"id": True, "conversations": turns("q", "a")}, "bad_id"),
    ({"id": "no_conv", "image": "red.png"}, "no_conversations"),
    ({"id": "conv_str", "conversations": "hello"}, "no_conversations"),
    ({"id": "conv_empty", "conversations": []}, "no_conversations"),
    ({"id": "turn_str", "conversations": ["hi", "there"]}, "bad_turn"),
    ({"id": "role_int", "conversations": turns("q", "a", roles=(3, "gpt"))}, "unknown_role"),
    ({"id": "two_humans", "conversations": turns("q", "a", roles=("human", "human"))}, "not_alternating"),
    ({"id": "odd", "conversations": turns("q", "a", "q2")}, "not_alternating"),
    ({"id": "value_int", "conversations": turns("q", 5)}, "bad_value"),
    ({"id": "value_none", "conversations": turns(None, "a")}, "bad_value"),
    ({"id": "type_int", "conversations": [*turns("q"), {"from": "gpt", "value": "a", "type": 7}]}, "bad_value"),
    ({"id": "image_int", "image": 5, "conversations": turns("<image>", "a")}, "bad_image_path"),
    ({"id": "image_empty", "image": "", "conversations": turns("<image>", "a")}, "bad_image_path"),
    ({"id": "no_placeholder", "image": "red.png", "conversations": turns("q", "a")}, "bad_placeholder"),
    ({"id": "late_placeholder", "image": "red.png", "conversations": turns("q", "a", "<image>", "b")}, "bad_placeholder"),
    ({"id": "two_placeholders", "image": "red.png", "conversations": turns("<image><image>", "a")}, "bad_placeholder"),
    ({"id": "escape", "image": "../../etc/passwd", "conversations": turns("<image>", "a")}, "image_outside_folder"),
    ({"id": "absolute", "image": "/etc/passwd", "conversations": turns("<image>", "a")}, "image_outside_folder"),
    ({"id": "sneaky", "image": "sub/../../red.png", "conversations": turns("<image>", "a")}, "image_outside_folder"),
    ({"id": "missing", "image": "nope.png", "conversations": turns("<image>", "a")}, "missing_image"),
    ({"id": "zero_bytes", "image": "empty.png", "conversations": turns("<image>", "a")}, "bad_image"),
    ({"id": "text_png", "image": "text.png", "conversations": turns("<image>", "a")}, "bad_image"),
]  # fmt: skip

BAD_WHEN_LOADED = [  # valid JSON, found only when the sample is built
    ({"id": "cut_png", "image": "cut.png", "conversations": turns("<image>", "a")}, "bad_image"),
    ({"id": "huge_prefix", "image": "red.png", "conversations": turns("x " * 400 + "<image>", "a")}, "too_long"),
    ({"id": "answer_cut", "image": "red.png", "conversations": turns("<image>\n" + "x " * 200, "a")}, "all_masked"),
]  # fmt: skip


def record_name(record, index: int) -> str:
    has_id = isinstance(record, dict) and isinstance(record.get("id"), str | int) and record["id"] is not True
    return str(record["id"]) if has_id else f"#{index}"


@pytest.fixture
def hostile(tmp_path) -> Path:
    """An image folder with good, odd and broken files; returns it."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 64), (255, 0, 0)).save(images / "red.png")
    Image.new("RGB", (64, 64), (255, 0, 0)).save(images / "sub" / "red.png")
    Image.new("L", (64, 64), 128).save(images / "gray.png")
    Image.new("RGBA", (64, 64), (0, 0, 255, 100)).save(images / "rgba.png")
    Image.new("RGB", (1, 1), (0, 255, 0)).save(images / "tiny.png")
    (images / "empty.png").write_bytes(b"")
    (images / "text.png").write_text("this is not an image\n")
    png = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(png, "PNG")
    (images / "cut.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    return images


def write(tmp_path: Path, records: list, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("index", range(len(BAD_AT_LOAD)))
def test_strict_mode_names_the_file_record_and_problem_at_load(tmp_path, hostile, index) -> None:
    bad, reason = BAD_AT_LOAD[index]
    path = write(tmp_path, [*GOOD, bad])
    with pytest.raises(
        RecordError, match=re.escape(f"{path}: record '{record_name(bad, len(GOOD))}'")
    ) as err:
        load_records(path, hostile, skip_bad_records=False)
    assert err.value.reason == reason


@pytest.mark.parametrize("index", range(len(BAD_WHEN_LOADED)))
def test_strict_mode_names_the_record_whose_sample_fails(tmp_path, hostile, index, easy_vqa_dir) -> None:
    bad, reason = BAD_WHEN_LOADED[index]
    data = datamodule(write(tmp_path, [*GOOD, bad]), hostile, easy_vqa_dir, skip_bad_records=False)
    dataset = data.datasets["train"]
    for i in range(len(GOOD)):
        assert "input_ids" in dataset[i]
    with pytest.raises(RecordError, match=re.escape(f"record '{bad['id']}'")) as err:
        dataset[len(GOOD)]
    assert err.value.reason == reason


@pytest.mark.parametrize("skip", [False, True])
def test_truncated_json_is_an_error_naming_the_file(tmp_path, hostile, skip) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(GOOD)[:-40])
    with pytest.raises(ValueError, match=re.escape(f"{path}: not valid JSON")):
        load_records(path, hostile, skip_bad_records=skip)


def datamodule(train_json: Path, images: Path, easy_vqa_dir: Path, **kwargs) -> InstructionDataModule:
    data = InstructionDataModule(
        train_json=str(train_json),
        val_json=str(train_json),
        image_folder=str(images),
        max_length=MAX_LENGTH,
        batch_size=3,
        **kwargs,
    )
    module = LVLMModule(tokenizer=str(easy_vqa_dir / "tokenizer"), lm_config=TINY_LM)
    data.attach(
        module.tokenizer, module.image_transform(True), module.image_transform(False), module.num_image_tokens
    )
    data.setup("fit")
    return data


class SeenKeys(L.Callback):
    def __init__(self) -> None:
        self.keys: list[tuple[str, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys += batch.get("keys", [])


def test_lenient_mode_trains_on_the_good_records_and_reports_every_skip(
    tmp_path, hostile, easy_vqa_dir
) -> None:
    bad = [record for record, _ in BAD_AT_LOAD + BAD_WHEN_LOADED]
    train_json = write(tmp_path, [bad[0], *GOOD[:4], *bad[1:20], *GOOD[4:], *bad[20:]])
    data = InstructionDataModule(
        train_json=str(train_json),
        val_json=str(write(tmp_path, GOOD[:2], "val.json")),
        image_folder=str(hostile),
        max_length=MAX_LENGTH,
        batch_size=2,
    )
    torch.manual_seed(0)
    module = LVLMModule(tokenizer=str(easy_vqa_dir / "tokenizer"), lm_config=TINY_LM, trainable=["lm"])
    seen = SeenKeys()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[seen],
    )
    with pytest.warns(UserWarning, match=r"skipped 25 of 37 records"):
        trainer.fit(module, data)
    ids = [str(record["id"]) for record in GOOD]
    good_keys = [(record_id, ids[: i + 1].count(record_id)) for i, record_id in enumerate(ids)]
    assert ("g0", 2) in good_keys and sorted(seen.keys) == sorted(good_keys * 2)  # each, once per epoch
    expected = Counter(reason for _, reason in BAD_AT_LOAD + BAD_WHEN_LOADED)
    assert data.skip_report() == {"train": expected}
    assert all(torch.isfinite(p).all() for p in module.parameters())
