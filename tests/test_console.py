"""The installed `stgc` console script as a user runs it: exit statuses, and what fit, validate,
test and predict leave in the log folder (an evaluation never touches the training run's record).
The runs are conftest's `console_runs`, which test_board reads too."""

import json

import pytest

from support.console import stgc
from support.fit import stage3_stgc


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_a_successful_run_exits_0(console_runs, subcommand) -> None:
    result = console_runs["results"][subcommand]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "No pretrained weights loaded" not in result.stderr  # open_clip's, misleading before a checkpoint


def test_evaluations_leave_the_training_record_untouched(console_runs) -> None:
    """The fit's config.yaml, hparams.yaml and event files are byte-identical after validate, test and
    predict; each evaluation logs in a subfolder of its own, with its own config.yaml."""
    folder = console_runs["folder"]
    assert "config.yaml" in console_runs["after_fit"]
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == console_runs["after_fit"]
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [
        "checkpoints",
        "predict",
        "test",
        "validate",
    ]
    for subcommand in ("validate", "test", "predict"):
        assert (folder / subcommand / "config.yaml").is_file()
        assert list((folder / subcommand).glob("events.out.tfevents.*"))


def test_predict_writes_one_line_per_answer_keyed_by_id_and_occurrence(console_runs) -> None:
    """In the test file's order; the three records that share an id come back told apart."""
    lines = (console_runs["folder"] / "predict" / "answers.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    records = json.loads(console_runs["test_json"].read_text())
    occurrences = [1, 2, 3, 1, 1]
    assert [{k: v for k, v in row.items() if k != "prediction"} for row in rows] == [
        {
            "id": record["id"],
            "occurrence": occurrence,
            "turn": 0,
            "question": record["conversations"][0]["value"],
            "reference": record["conversations"][1]["value"],
            "question_type": record["conversations"][1]["type"],
        }
        for record, occurrence in zip(records, occurrences, strict=True)
    ]
    assert [row["id"] for row in rows[:3]] == ["same"] * 3
    assert all(isinstance(row["prediction"], str) for row in rows)


def test_bad_input_exits_non_zero_with_a_readable_message(easy_vqa_dir, tmp_path) -> None:
    args = stage3_stgc(easy_vqa_dir, tmp_path, 1)
    unknown_key = stgc("fit", *args, "--trainer.no_such_option=1")
    assert unknown_key.returncode == 2 and "no_such_option" in unknown_key.stderr
    missing = tmp_path / "missing.json"
    missing_file = stgc("fit", *args, f"--data.init_args.train_json={missing}")
    assert missing_file.returncode == 1
    assert missing_file.stderr.strip().splitlines()[-1] == (
        f"stgc: error: FileNotFoundError: [Errno 2] No such file or directory: '{missing}'"
    )
