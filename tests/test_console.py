"""The installed `stgc` console script as a user runs it: exit statuses, and what fit, validate,
test and predict leave in the log folder (an evaluation never touches the training run's record)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.fit import ENV, ROOT, stage3_stgc

STGC = Path(sys.executable).parent / "stgc"  # the console script pip installed beside this python
RUN = "stage3_stgc"


def stgc(*args: str) -> subprocess.CompletedProcess:
    """Run the installed script from the repository root; nothing it prints may be an object's repr."""
    result = subprocess.run(
        [str(STGC), *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert "object at 0x" not in result.stdout + result.stderr, result.stderr[-2000:]
    return result


def repeated_id_test_file(data_dir: Path, path: Path) -> Path:
    """easy-vqa test records: the three questions about one image share one id ("same"), two others keep theirs."""
    records = json.loads((data_dir / "instruct_test.json").read_text())
    image = records[0]["image"]
    same = [r for r in records if r["image"] == image][:3]
    others = [r for r in records if r["image"] != image][:2]
    assert len(same) == 3
    path.write_text(json.dumps([{**r, "id": "same"} for r in same] + others))
    return path


@pytest.fixture(scope="module")
def runs(easy_vqa_dir, tmp_path_factory) -> dict:
    """fit, then validate, test and predict of its last.ckpt, each through the console script; what
    the run folder holds after the fit is kept to compare."""
    log_root = tmp_path_factory.mktemp("console")
    test_json = repeated_id_test_file(easy_vqa_dir, log_root / "test.json")
    args = [
        *stage3_stgc(easy_vqa_dir, log_root, 1, "--trainer.limit_train_batches=2"),
        f"--data.init_args.test_json={test_json}",
    ]
    folder = log_root / "easy_vqa" / RUN
    results = {"fit": stgc("fit", *args)}
    assert results["fit"].returncode == 0, results["fit"].stderr[-3000:]
    after_fit = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}  # config, hparams, events
    checkpoint = f"--ckpt_path={folder / 'checkpoints' / 'last.ckpt'}"
    for subcommand in ("validate", "test", "predict"):
        results[subcommand] = stgc(subcommand, *args, checkpoint)
    return {"folder": folder, "results": results, "after_fit": after_fit, "test_json": test_json}


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_a_successful_run_exits_0(runs, subcommand) -> None:
    result = runs["results"][subcommand]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "No pretrained weights loaded" not in result.stderr  # open_clip's, misleading before a checkpoint


def test_evaluations_leave_the_training_record_untouched(runs) -> None:
    """The fit's config.yaml, hparams.yaml and event files are byte-identical after validate, test and
    predict; each evaluation logs in a subfolder of its own, with its own config.yaml."""
    folder = runs["folder"]
    assert "config.yaml" in runs["after_fit"]
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == runs["after_fit"]
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [
        "checkpoints",
        "predict",
        "test",
        "validate",
    ]
    for subcommand in ("validate", "test", "predict"):
        assert (folder / subcommand / "config.yaml").is_file()
        assert list((folder / subcommand).glob("events.out.tfevents.*"))


def test_predict_writes_one_line_per_answer_keyed_by_id_and_occurrence(runs) -> None:
    """In the test file's order; the three records that share an id come back told apart."""
    lines = (runs["folder"] / "predict" / "answers.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    records = json.loads(runs["test_json"].read_text())
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
