"""The planted-conflict benchmark's pipeline level: the planted records, the ground truth on a batch the
real DataModule builds, and a quick run of the script through `stgc fit` (files and fields only)."""

import json
import random
import subprocess
import sys

import pytest
from torchvision.transforms.functional import to_tensor

from stgc.constants import IGNORE_INDEX
from stgc.data import InstructionDataModule
from stgc_experiments.planted.questions import (
    BASE_PREFIX,
    CUE,
    PLANTED,
    QuestionTruth,
    planted_copy,
    planted_split,
)
from support.fit import ENV, ROOT
from support.planted import assert_arms_complete


@pytest.fixture(scope="module")
def records(easy_vqa_dir) -> list[dict]:
    return json.loads((easy_vqa_dir / "instruct_train.json").read_text())[:60]


def test_a_planted_copy_puts_the_cue_first_and_flips_the_answer(records) -> None:
    base = next(r for r in records if r["conversations"][1]["type"] == "yes/no")
    copy = planted_copy(base)
    question = base["conversations"][0]["value"].split("\n", 1)[1]
    assert copy["id"] == f"{PLANTED}/{base['id']}" and copy["image"] == base["image"]
    assert copy["conversations"][0]["value"] == f"<image>\n{CUE} {question}"
    assert {copy["conversations"][1]["value"], base["conversations"][1]["value"]} == {"yes", "no"}
    assert copy["conversations"][1]["type"] == PLANTED


def test_planted_split_marks_the_base_yes_no_records_and_plants_the_share(records) -> None:
    data = planted_split(records, 40, 0.2, random.Random(0))
    planted = [r for r in data if r["id"].startswith(PLANTED + "/")]
    base = [r for r in data if r["id"].startswith(BASE_PREFIX)]
    others = [r for r in data if r not in planted and r not in base]
    assert len(data) == 40 + len(planted)
    assert all(r["conversations"][1]["type"] == "yes/no" for r in base)
    assert all(r["conversations"][1]["type"] != "yes/no" for r in others)
    assert len(planted) == round(0.25 * len(base)) > 0  # 0.2 of the yes/no records: 1 planted per 4 base
    assert {r["id"].split("/", 1)[1] for r in planted} <= {r["id"][len(BASE_PREFIX) :] for r in base}


def test_question_truth_labels_the_decision_position_of_yes_no_records(
    records, easy_vqa_dir, easy_vqa_tokenizer, tmp_path
) -> None:
    data = planted_split(records, 40, 0.5, random.Random(1))
    (tmp_path / "train.json").write_text(json.dumps(data))
    datamodule = InstructionDataModule(
        train_json=str(tmp_path / "train.json"), image_folder=str(easy_vqa_dir / "images"),
        val_fraction=0.05, batch_size=len(data), system_prompt="",
    )  # fmt: skip
    datamodule.attach(easy_vqa_tokenizer, to_tensor, to_tensor, num_image_tokens=4)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    rows, length = batch["labels"].shape
    truth = QuestionTruth()
    side = truth.sides(batch).view(rows, length)
    by_id = {r["id"]: r for r in data}
    seen = set()
    for row, (record_id, _) in enumerate(batch["keys"]):
        labelled = (side[row] >= 0).nonzero().flatten().tolist()
        record = by_id[record_id]
        if not record_id.startswith((PLANTED + "/", BASE_PREFIX)):
            assert labelled == [], record_id
            continue
        (position,) = labelled  # one token per yes/no record
        family = int(side[row, position])
        seen.add(family)
        assert family == (1 if record_id.startswith(PLANTED) else 0)
        answer = easy_vqa_tokenizer(
            " " + record["conversations"][1]["value"], add_special_tokens=False
        ).input_ids
        assert batch["labels"][row, position + 1] == answer[0]  # it predicts the answer's first token
        assert (batch["labels"][row, : position + 1] == IGNORE_INDEX).all()
        cue_seen = CUE in easy_vqa_tokenizer.decode(batch["input_ids"][row, : position + 1].clamp(min=0))
        assert cue_seen == (family == 1)
        ids = truth.token_ids(batch).view(rows, length)
        assert ids[row, position] == batch["indices"][row]
    assert seen == {0, 1}


@pytest.mark.slow
def test_quick_pipeline_writes_runs_summary_and_figures(tmp_path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "scripts/planted_pipeline.py", "--quick", "--seeds", "1", "--out", str(out),
         "--log-root", str(tmp_path / "logs")],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("summary.json", "results.md", "roc.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    (cell,) = summary["cells"].values()
    assert_arms_complete(cell["settings"][summary["chosen"]], seeds=[0])
    run = json.loads((out / "runs" / "easy_vqa_share0.2" / "baseline" / "seed0.json").read_text())
    assert set(run["family_accuracy"]) >= {"overall", "yes_no", PLANTED} and run["steps"] == 3
    assert len(run["correct"]) == len(run["questions"]) > 0 and 0 <= run["planted_split"] <= 1
