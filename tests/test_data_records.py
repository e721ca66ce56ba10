"""Parsing and validation of LLaVA JSON records."""

import json
import re

import pytest

from stgc.data.records import Turn, load_records


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
    assert records[0].id == "typed" and records[0].image == images / "typed.png"
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
