"""Parsing and validation of LLaVA JSON records."""

import json
import re

import pytest
from PIL import Image

from stgc.data import records as records_module
from stgc.data.records import JSONList, Turn, load_records


def conv(*values: str, roles: tuple[str, ...] = ("human", "gpt")) -> list[dict]:
    """Turns with alternating roles (or the roles given, cycled)."""
    return [{"from": roles[i % len(roles)], "value": v} for i, v in enumerate(values)]


def good(record_id: str = "ok") -> dict:
    """A valid two-turn image record."""
    return {
        "id": record_id,
        "image": f"{record_id}.png",
        "conversations": conv("<image>\nq1", "a1", "q2", "a2"),
    }


def test_parses_turns_types_and_paths(write_llava):
    text_only = {"id": "t", "conversations": conv("hi", "hello")}
    typed = good("typed")
    typed["conversations"][1]["type"] = "color"
    path, images = write_llava([typed, text_only])
    records, skipped = load_records(path, images)
    assert not skipped
    assert records[0].id == "typed" and records[0].image == str(images / "typed.png")
    assert records[0].turns == (Turn("<image>\nq1", "a1", "color"), Turn("q2", "a2", "other"))
    assert records[1].image is None and records[1].turns == (Turn("hi", "hello"),)
    assert records[0].source == str(path)


BAD = {
    "no_conversations": {"id": "bad", "image": "bad.png"},
    "unknown_role": {
        "id": "bad",
        "image": "bad.png",
        "conversations": conv("<image>", "a", roles=("human", "bot")),
    },
    "not_alternating": {
        "id": "bad",
        "image": "bad.png",
        "conversations": conv("a", "<image>", roles=("gpt", "human")),
    },
    "bad_placeholder": {"id": "bad", "image": "bad.png", "conversations": conv("q", "a")},
    "missing_image": {"id": "bad", "image": "bad.png", "conversations": conv("<image>", "a")},
}


@pytest.mark.parametrize("reason", BAD)
def test_bad_record_strict_names_file_and_id(write_llava, reason):
    path, images = write_llava([good(), BAD[reason]])
    if reason == "missing_image":
        (images / "bad.png").unlink()
    with pytest.raises(ValueError, match=re.escape(f"{path}: record 'bad'")):
        load_records(path, images, skip_bad_records=False)


@pytest.mark.parametrize("reason", BAD)
def test_bad_record_skipped_and_counted(write_llava, reason):
    path, images = write_llava([good(), BAD[reason], good("ok2")])
    if reason == "missing_image":
        (images / "bad.png").unlink()
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 records") as warned:
        records, skipped = load_records(path, images, skip_bad_records=True)
    assert len(warned) == 1
    assert [r.id for r in records] == ["ok", "ok2"]
    assert skipped == {reason: 1}


def test_json_not_a_list_is_always_an_error(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"id": "x"}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: expected a JSON list")):
        load_records(path, tmp_path, skip_bad_records=True)


def test_limit_records_keeps_the_first(write_llava):
    path, images = write_llava([good(f"r{i}") for i in range(5)])
    records, _ = load_records(path, images, limit_records=2)
    assert [r.id for r in records] == ["r0", "r1"]


def test_repeated_ids_are_kept_each_with_its_occurrence(write_llava, recwarn):
    """LLaVA files reuse an image's id for its records from several sources: nothing is skipped."""
    same = [
        {"id": "a", "image": "a.png", "conversations": conv("<image>\nq", f"answer {k}")} for k in range(3)
    ]
    path, images = write_llava([same[0], good("b"), same[1], same[2]])
    records, skipped = load_records(path, images, skip_bad_records=True)
    assert not skipped and not [w for w in recwarn if "skipped" in str(w.message)]
    assert [r.key for r in records] == [("a", 1), ("b", 1), ("a", 2), ("a", 3)]
    assert [r.turns[0].answer for r in records if r.id == "a"] == ["answer 0", "answer 1", "answer 2"]


def test_an_error_in_a_repeated_id_names_its_occurrence(write_llava):
    records = [good("a"), good("a") | {"conversations": conv("<image>", "x", "y")}]
    path, images = write_llava(records)
    with pytest.raises(ValueError, match=re.escape(f"{path}: record 'a' (occurrence 2): roles")):
        load_records(path, images, skip_bad_records=False)


def test_images_without_a_signature_are_checked_by_pillow(write_llava):
    """TGA has no magic bytes: such a file is opened by Pillow instead, and passes when it decodes;
    a file whose bytes are another format than its name says passes too (as Image.open takes it)."""
    path, images = write_llava([])
    Image.new("RGB", (4, 4)).save(images / "t.tga")
    Image.new("RGB", (4, 4)).save(images / "jpeg_named.png", "JPEG")
    raw = [
        {"id": "t", "image": "t.tga", "conversations": conv("<image>", "a")},
        {"id": "j", "image": "jpeg_named.png", "conversations": conv("<image>", "a")},
    ]
    path.write_text(json.dumps(raw))
    records, _ = load_records(path, images, skip_bad_records=False)
    assert [r.image for r in records] == [str(images / "t.tga"), str(images / "jpeg_named.png")]


JSON_TEXTS = [
    "[]",
    ' [ {"a": [1, 2, "x]"]}, "s", 12345678901234, -0.5e-7, null, true, false, 4.5e10 ] \n',
    '[{"é": "😀 東京"}, 3]',
]


@pytest.mark.parametrize("chunk", [1, 3, 7, 4096])
def test_the_list_is_decoded_the_same_whatever_the_window(tmp_path, monkeypatch, chunk):
    """Values cut by the window's end ("4." of "4.5e10", half a string) decode whole."""
    monkeypatch.setattr(records_module, "CHUNK", chunk)
    for k, text in enumerate(JSON_TEXTS):
        path = tmp_path / f"{k}.json"
        path.write_text(text, encoding="utf-8")
        with open(path, encoding="utf-8") as f:
            assert list(JSONList(f, path)) == json.loads(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1,", "not valid JSON (Expecting value at character 3)"),
        ("[1 2]", "not valid JSON (expected ',' or ']', found '2' at character 3)"),
        ("[1] x", "not valid JSON (extra data after the list at character 4)"),
        ("", "not valid JSON (Expecting value at character 0)"),
        ('"records"', "expected a JSON list of records, got str"),
    ],
)
def test_bad_json_names_the_file_and_where(tmp_path, monkeypatch, text, message):
    monkeypatch.setattr(records_module, "CHUNK", 2)
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        load_records(path, tmp_path)


def test_limit_records_reads_no_further(write_llava):
    path, images = write_llava([good(f"r{i}") for i in range(3)])
    path.write_text(path.read_text()[:-1] + ", not json at all")  # broken after the third record
    records, _ = load_records(path, images, limit_records=3)
    assert [r.id for r in records] == ["r0", "r1", "r2"]
