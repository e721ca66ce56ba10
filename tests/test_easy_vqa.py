"""The bundled easy-VQA: layout, captions consistent with answers, idempotence, tokenizer, DataModules."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from stgc.data.records import load_records
from stgc.data.templates import DEFAULT_SYSTEM_PROMPT
from stgc.easy_vqa import EasyVQAInstructionDataModule, EasyVQAPretrainDataModule
from stgc.easy_vqa.prepare import FORMAT, PALETTE, QUESTION_TYPES, SHAPES, captions, prepare, question_type

JSON_FILES = ("pretrain_train.json", "pretrain_test.json", "instruct_train.json", "instruct_test.json")


def test_layout_and_counts(easy_vqa_dir):
    assert len(list((easy_vqa_dir / "images" / "train").glob("*.png"))) == 4000
    assert len(list((easy_vqa_dir / "images" / "test").glob("*.png"))) == 1000
    pretrain = json.loads((easy_vqa_dir / "pretrain_test.json").read_text())
    assert len(pretrain) == 1000 and pretrain[0]["id"] == "test_0" and pretrain[0]["image"] == "test/0.png"
    instruct, skipped = load_records(
        easy_vqa_dir / "instruct_test.json", easy_vqa_dir / "images", skip_bad_records=False
    )
    assert not skipped and len(instruct) == 9673 and all(len(r.turns) == 1 for r in instruct)
    assert all(r.turns[0].question.startswith("<image>\n") for r in instruct)
    assert (instruct[0].id, instruct[0].image) == (
        "test_0_q0",
        str(easy_vqa_dir / "images" / "test" / "0.png"),
    )


def test_captions_agree_with_answers(easy_vqa_dir):
    for split in ("train", "test"):
        pretrain = json.loads((easy_vqa_dir / f"pretrain_{split}.json").read_text())
        caption = {r["image"]: r["conversations"][1]["value"] for r in pretrain}
        for record in json.loads((easy_vqa_dir / f"instruct_{split}.json").read_text()):
            _, colour, shape = caption[record["image"]].split()
            assert colour in PALETTE and shape in (*SHAPES, "shape")
            for turn in record["conversations"][1::2]:
                assert turn["type"] == question_type(turn["value"])
                if turn["type"] == "color":
                    assert turn["value"] == colour
                elif turn["type"] == "shape":
                    assert turn["value"] == shape


def test_text_only_records_are_the_colour_questions_with_the_caption_stated(easy_vqa_dir):
    """instruct_text: each question about colour, its image's caption stated instead of the image."""
    for split in ("train", "test"):
        pretrain = json.loads((easy_vqa_dir / f"pretrain_{split}.json").read_text())
        caption = {r["image"]: r["conversations"][1]["value"] for r in pretrain}
        instruct = json.loads((easy_vqa_dir / f"instruct_{split}.json").read_text())
        text = {r["id"]: r for r in json.loads((easy_vqa_dir / f"instruct_text_{split}.json").read_text())}
        about_color = []
        for record in instruct:
            question, answer = record["conversations"]
            asked = set(question["value"].rstrip("?").split()) & set(PALETTE)
            if answer["type"] == "color" or asked:
                about_color.append(record)
            elif answer["type"] == "yes/no":  # the others ask about a shape
                assert set(question["value"].rstrip("?").split()) & set(SHAPES)
        assert len(text) == len(about_color) < len(instruct)
        for record in about_color:
            stated = text[record["id"] + "_text"]
            question, answer = record["conversations"]
            assert "image" not in stated and stated["conversations"][1] == answer
            assert stated["conversations"][0]["value"] == (
                f"the image shows {caption[record['image']]}. " + question["value"].removeprefix("<image>\n")
            )


def test_captions_from_facts_elimination_and_pixels(tmp_path):
    Image.new("RGB", (8, 8), PALETTE["teal"]).save(tmp_path / "teal.png")
    questions = [
        "is there a circle?",
        "is there not a triangle?",
        "what color is the shape?",
        "is there a blue shape?",
    ]
    answers = ["no", "no", "red", "no"]
    paths = {0: tmp_path / "teal.png", 1: tmp_path / "teal.png"}
    # image 0: not a circle, a triangle (negation), red; image 1: nothing but "not blue" -> pixels, no shape
    result = captions(questions, answers, [0, 0, 0, 1], paths)
    assert result == {0: "a red triangle", 1: "a teal shape"}
    with pytest.raises(ValueError, match="contradict"):
        captions(["what color is the shape?", "what color is the shape?"], ["red", "blue"], [0, 0], paths)


def test_question_type():
    assert [question_type(a) for a in ("yes", "no", "circle", "gray")] == [
        "yes/no",
        "yes/no",
        "shape",
        "color",
    ]
    with pytest.raises(ValueError, match="'purple'"):
        question_type("purple")


def test_prepare_is_idempotent(easy_vqa_dir, capsys):
    outputs = [easy_vqa_dir / f for f in JSON_FILES] + [easy_vqa_dir / "tokenizer" / "tokenizer.json"]
    before = {p: p.stat().st_mtime_ns for p in outputs}
    missing = easy_vqa_dir / "images" / "train" / "7.png"
    content = missing.read_bytes()
    missing.unlink()
    prepare(easy_vqa_dir)
    assert {p: p.stat().st_mtime_ns for p in outputs} == before
    assert missing.read_bytes() == content
    assert "complete (1 images copied" in capsys.readouterr().out


def test_prepare_rebuilds_an_older_layout(easy_vqa_dir, tmp_path, capsys):
    """A folder from an older prepare (no FORMAT file, one conversation per image) is rebuilt."""
    old = tmp_path / "old"
    shutil.copytree(easy_vqa_dir, old, ignore=shutil.ignore_patterns("images"))
    (old / "images").symlink_to(easy_vqa_dir / "images")
    (old / "FORMAT").unlink()
    (old / "instruct_test.json").write_text('[{"id": "test_0", "image": "test/0.png", "conversations": []}]')
    prepare(old)
    assert "complete" not in capsys.readouterr().out
    assert (old / "FORMAT").read_text().strip() == FORMAT
    assert (old / "instruct_test.json").read_text() == (easy_vqa_dir / "instruct_test.json").read_text()


def test_tokenizer_round_trip(easy_vqa_tokenizer):
    tok = easy_vqa_tokenizer
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3 and len(tok) <= 1000
    text = f"{DEFAULT_SYSTEM_PROMPT} USER: \nwhat color is the circle? ASSISTANT: teal"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and tok.unk_token_id not in ids


def test_script_prepares(tmp_path, monkeypatch, easy_vqa_dir):
    import runpy

    monkeypatch.setattr("sys.argv", ["prepare_easy_vqa.py", "--out", str(easy_vqa_dir)])
    runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "prepare_easy_vqa.py"), run_name="__main__")


def test_datamodules_prepare_a_missing_file_and_score_by_question_type(easy_vqa_dir, tmp_path, capsys):
    """prepare_data runs prepare() only when a file of the DataModule is missing; the instruction
    DataModule reports the question types that question_type() labels answers with."""
    data = tmp_path / "easy_vqa"
    shutil.copytree(easy_vqa_dir, data, ignore=shutil.ignore_patterns("images"))
    (data / "images").symlink_to(easy_vqa_dir / "images")
    files = {"image_folder": str(data / "images"), "train_json": str(data / "pretrain_train.json")}
    EasyVQAPretrainDataModule(**files).prepare_data()
    assert capsys.readouterr().out == ""
    (data / "pretrain_test.json").unlink()
    EasyVQAPretrainDataModule(**files, test_json=str(data / "pretrain_test.json")).prepare_data()
    assert f"easy-VQA in {data}" in capsys.readouterr().out and (data / "pretrain_test.json").is_file()
    instruct = EasyVQAInstructionDataModule(**files | {"train_json": str(data / "instruct_train.json")})
    assert instruct.question_types == QUESTION_TYPES
    records = json.loads((data / "instruct_test.json").read_text())
    assert {turn["type"] for r in records for turn in r["conversations"][1::2]} == set(QUESTION_TYPES)


def test_the_general_package_does_not_import_easy_vqa() -> None:
    code = "import sys, stgc.cli, stgc.data, stgc.module; print(sorted(m for m in sys.modules if 'easy_vqa' in m))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        == "[]\n"
    )
