"""The generated Sort-of-CLEVR: determinism, answers against a brute force over the scenes, families
and counts, objects drawn where the scenes say, the text-only family describing the same scenes."""

import json
import math
import re
import runpy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stgc.data.records import load_records
from stgc.sort_of_clevr.prepare import HALF_SIZE, PALETTE, QUESTION_TYPES, SPLITS, prepare, subtype_of

QUESTIONS = {  # question pattern -> subtype, written out here independently of the generator's templates
    r"what is the shape of the (\w+) object\?": "shape",
    r"is the (\w+) object on the left or on the right\?": "horizontal",
    r"is the (\w+) object at the top or at the bottom\?": "vertical",
    r"what is the shape of the object closest to the (\w+) object\?": "closest",
    r"what is the shape of the object furthest from the (\w+) object\?": "furthest",
    r"how many objects have the same shape as the (\w+) object\?": "count",
}
FAMILY = {"shape": "non_relational", "horizontal": "non_relational", "vertical": "non_relational",
          "closest": "relational", "furthest": "relational", "count": "count"}  # fmt: skip


@pytest.fixture(scope="module")
def soc_dir(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("sort_of_clevr"))


def read(folder: Path, kind: str, split: str) -> list[dict]:
    return json.loads((folder / f"{kind}_{split}.json").read_text())


def parse_question(text: str) -> tuple[str, str]:
    """(subtype, colour) of a question, by the patterns above."""
    for pattern, subtype in QUESTIONS.items():
        if match := re.fullmatch(pattern, text):
            return subtype, match.group(1)
    raise AssertionError(f"unknown question {text!r}")


def brute_force(objects: list[dict], subtype: str, colour: str) -> str:
    """The answer, from Euclidean distances over every other object (floats, not the generator's ints)."""
    (me,) = [o for o in objects if o["colour"] == colour]
    others = [o for o in objects if o is not me]
    distance = [math.hypot(o["x"] - me["x"], o["y"] - me["y"]) for o in others]
    if subtype == "shape":
        return me["shape"]
    if subtype == "horizontal":
        return "left" if 2 * me["x"] < 75 else "right"
    if subtype == "vertical":
        return "top" if 2 * me["y"] < 75 else "bottom"
    if subtype in ("closest", "furthest"):
        ranked = sorted(zip(distance, range(len(others)), strict=True))
        best = ranked[0] if subtype == "closest" else ranked[-1]
        runner_up = ranked[1] if subtype == "closest" else ranked[-2]
        assert best[0] != runner_up[0], f"tie in {objects}"
        return others[best[1]]["shape"]
    return str(1 + sum(o["shape"] == me["shape"] for o in others))


def test_layout_families_and_counts(soc_dir):
    assert QUESTION_TYPES == ("non_relational", "relational", "count", "text_only")
    for split, n in SPLITS.items():
        assert len(list((soc_dir / "images" / split).glob("*.png"))) == n
        assert len(read(soc_dir, "pretrain", split)) == len(read(soc_dir, "scenes", split)) == n
        instruct = read(soc_dir, "instruct", split)
        assert len(instruct) == 12 * n and len(read(soc_dir, "instruct_text", split)) == 3 * n
        per_image = Counter((r["image"], r["conversations"][1]["type"]) for r in instruct)
        assert set(per_image.values()) == {6, 4, 2} and len(per_image) == 3 * n
        for path, folder in [(soc_dir / f"{kind}_{split}.json", soc_dir / "images") for kind in
                             ("pretrain", "instruct", "instruct_text")]:  # fmt: skip
            records, skipped = load_records(path, folder, skip_bad_records=False)
            assert not skipped and records
    first = read(soc_dir, "instruct", "train")[0]
    assert first["id"] == "train_0_q0" and first["image"] == "train/0.png"


def test_answers_match_a_brute_force_over_the_scene(soc_dir):
    seen = Counter()
    for split in SPLITS:
        scenes = {s["image"]: s["objects"] for s in read(soc_dir, "scenes", split)}
        for record in read(soc_dir, "instruct", split):
            question, reply = record["conversations"]
            subtype, colour = parse_question(question["value"].removeprefix("<image>\n"))
            assert reply["value"] == brute_force(scenes[record["image"]], subtype, colour)
            assert reply["type"] == FAMILY[subtype]
            assert subtype_of(record["id"]) == subtype
            seen[subtype, reply["value"]] += 1
    assert {a for s, a in seen if s == "count"} == {"1", "2", "3", "4", "5", "6"}
    assert {a for s, a in seen if s in ("shape", "closest", "furthest")} == {"square", "circle"}


def test_scenes_are_valid_and_captioned(soc_dir):
    for split in SPLITS:
        captions = {r["image"]: r["conversations"][1]["value"] for r in read(soc_dir, "pretrain", split)}
        for scene in read(soc_dir, "scenes", split):
            objects = scene["objects"]
            assert [o["colour"] for o in objects] == list(PALETTE)
            for a in objects:
                assert HALF_SIZE <= min(a["x"], a["y"]) and max(a["x"], a["y"]) < 75 - HALF_SIZE
                for b in objects:  # bounding boxes apart
                    assert a is b or max(abs(a["x"] - b["x"]), abs(a["y"] - b["y"])) > 2 * HALF_SIZE
            expected = ", ".join(
                f"{o['colour']} {o['shape']} {'top' if o['y'] < 37.5 else 'bottom'} "
                f"{'left' if o['x'] < 37.5 else 'right'}"
                for o in objects
            )
            assert captions[scene["image"]] == expected


def test_images_draw_each_object_where_its_scene_says(soc_dir):
    colours = {tuple(v): k for k, v in PALETTE.items()}
    for scene in read(soc_dir, "scenes", "test"):
        with Image.open(soc_dir / "images" / scene["image"]) as image:
            assert image.size == (75, 75) and image.mode == "RGB"
            rgb = np.asarray(image)  # (75, 75, 3), rows are y
        found = {tuple(c) for c in rgb.reshape(-1, 3)} - {(255, 255, 255)}
        assert found == set(colours)  # the six fills on white, nothing anti-aliased
        for o in scene["objects"]:
            ys, xs = np.nonzero((rgb == PALETTE[o["colour"]]).all(-1))
            r = HALF_SIZE
            assert (xs.min(), xs.max(), ys.min(), ys.max()) == (
                o["x"] - r,
                o["x"] + r,
                o["y"] - r,
                o["y"] + r,
            )
            if o["shape"] == "square":
                assert len(xs) == (2 * r + 1) ** 2
            else:  # a disc: its box's corners stay white, its area is about pi r^2
                assert math.pi * r**2 < len(xs) < (2 * r + 1) ** 2 - 4
                corners = rgb[[o["y"] - r, o["y"] - r, o["y"] + r, o["y"] + r], [o["x"] - r, o["x"] + r] * 2]
                assert (corners == 255).all()


def test_text_only_records_describe_the_same_scene_without_the_image(soc_dir):
    pattern = re.compile(r"(\w+) (square|circle) at \((\d+), (\d+)\)")
    for split in SPLITS:
        scenes = {s["image"]: s["objects"] for s in read(soc_dir, "scenes", split)}
        image_questions = {r["id"]: r for r in read(soc_dir, "instruct", split)}
        families = Counter()
        for record in read(soc_dir, "instruct_text", split):
            assert "image" not in record and "<image>" not in json.dumps(record)
            original = image_questions[record["id"].removesuffix("_text")]
            (prompt, reply), (question, original_reply) = record["conversations"], original["conversations"]
            description, asked = prompt["value"].split(". ", 1)
            stated = [
                {"colour": c, "shape": s, "x": int(x), "y": int(y)}
                for c, s, x, y in pattern.findall(description)
            ]
            objects = scenes[original["image"]]
            assert len(stated) == 6 and sorted(stated, key=str) == sorted(objects, key=str)
            assert asked == question["value"].removeprefix("<image>\n")
            assert reply == {"from": "gpt", "value": original_reply["value"], "type": "text_only"}
            assert reply["value"] == brute_force(stated, *parse_question(asked))
            assert subtype_of(record["id"]) == parse_question(asked)[0]
            families[original["image"], original_reply["type"]] += 1
        assert set(families.values()) == {1} and len(families) == 3 * SPLITS[split]


def test_same_seed_same_bytes_other_seed_other_scenes(tmp_path):
    sizes = {"train": 30, "val": 5, "test": 5}
    first, again, other = (
        prepare(tmp_path / name, seed, sizes) for name, seed in [("a", 0), ("b", 0), ("c", 1)]
    )
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 40 + 12 + 1 + len(list((first / "tokenizer").iterdir()))
    for name in files:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    assert (first / "scenes_train.json").read_text() != (other / "scenes_train.json").read_text()
    # the splits draw different scenes
    train, test = read(first, "scenes", "train")[:5], read(first, "scenes", "test")
    assert [s["objects"] for s in train] != [s["objects"] for s in test]


def test_prepare_is_idempotent_and_rebuilds_on_other_settings(tmp_path, capsys):
    sizes = {"train": 10, "val": 2, "test": 2}
    prepare(tmp_path, 0, sizes)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")}
    prepare(tmp_path, 0, sizes)
    assert "complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")} == before
    prepare(tmp_path, 1, sizes)
    assert "complete" not in capsys.readouterr().out
    assert (tmp_path / "FORMAT").read_text().split()[1] == "seed=1"


def test_tokenizer_covers_every_text(soc_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(soc_dir / "tokenizer")
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    for kind in ("pretrain", "instruct_text"):
        for record in read(soc_dir, kind, "test")[:200]:
            for turn in record["conversations"]:
                ids = tok(" " + turn["value"].replace("<image>", "").strip(), add_special_tokens=False)[
                    "input_ids"
                ]
                assert (
                    tok.unk_token_id not in ids
                    and tok.decode(ids).strip() == turn["value"].replace("<image>", "").strip()
                )


def test_script_prepares(soc_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["prepare_sort_of_clevr.py", "--out", str(soc_dir)])
    runpy.run_path(
        str(Path(__file__).parents[1] / "scripts" / "prepare_sort_of_clevr.py"), run_name="__main__"
    )
    assert "complete" in capsys.readouterr().out
