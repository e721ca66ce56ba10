"""`stgc fit` of stage III with STGC under DDP on 2 CPU processes (gloo), through the CLI."""

import json
import sys
from pathlib import Path

import pytest
import torch

from stgc.cli import run as stgc
from support.fit import ROOT, fit_command, run, stage3_stgc

EPOCHS = 2


@pytest.fixture(scope="module")
def ddp_run(easy_vqa_dir, tmp_path_factory) -> tuple[Path, list[dict]]:
    log_root = tmp_path_factory.mktemp("ddp")
    ranks_dir = log_root / "ranks"
    ddp = ["-c", "configs/trainer/ddp.yaml", "--trainer.accelerator=cpu", "--trainer.devices=2"]
    record = ["--trainer.callbacks+=support.ranks.RecordRanks", f"--trainer.callbacks.out_dir={ranks_dir}"]
    run(
        fit_command(
            [*stage3_stgc(easy_vqa_dir, log_root, EPOCHS, *ddp, "--trainer.limit_val_batches=null"), *record]
        )
    )
    return log_root, [torch.load(ranks_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_replicas_hold_identical_weights(ddp_run) -> None:
    _, ranks = ddp_run
    for key, value in ranks[0]["state_dict"].items():
        assert torch.equal(value, ranks[1]["state_dict"][key]), key


def test_each_record_is_seen_by_one_rank_per_epoch(ddp_run) -> None:
    """24 train records (3 images' questions), batch 4 per rank: 3 steps of 2 × 4, no padding
    needed; the 12 val questions (the 4th image's) are split over the ranks without repeats."""
    _, ranks = ddp_run
    for epoch in range(EPOCHS):
        rank0, rank1 = (ranks[r]["train_ids"][epoch] for r in range(2))
        assert len(rank0) == len(rank1) == 12 and not set(rank0) & set(rank1)
        val0, val1 = (ranks[r]["val_ids"][epoch] for r in range(2))
        assert len(val0) == len(val1) == 6 and len(set(val0 + val1)) == 12
    assert set(ranks[0]["train_ids"][0]) | set(ranks[1]["train_ids"][0]) == set(
        ranks[0]["train_ids"][1]
    ) | set(ranks[1]["train_ids"][1])


def test_stgc_statistics_are_global_sums_of_per_rank_conflicts(ddp_run) -> None:
    """Each rank flags its own tokens; the logged ratio is all ranks' conflicts over all their tokens."""
    _, ranks = ddp_run
    conflicts, assignments = 0, 0
    for rank in ranks:
        (c_before, a_before), (c_last, a_last) = rank["step_counts"][-2:]
        conflicts += int((c_last - c_before).sum())
        assignments += int((a_last - a_before).sum())
    rank0_only = (ranks[0]["step_counts"][-1][0] - ranks[0]["step_counts"][-2][0]).sum() / (
        ranks[0]["step_counts"][-1][1] - ranks[0]["step_counts"][-2][1]
    ).sum()
    logged = ranks[0]["metrics"]["stgc/conflict_ratio/all"]
    assert logged == pytest.approx(conflicts / assignments, abs=1e-6)
    assert 0 < logged < 1 and logged != pytest.approx(float(rank0_only), abs=1e-6)


def test_vqa_metric_is_reduced_over_all_val_answers(ddp_run, easy_vqa_dir, tmp_path, monkeypatch) -> None:
    """The DDP-logged val accuracy and loss equal a single-process `stgc validate` of the final weights."""
    log_root, ranks = ddp_run
    checkpoint = log_root / "easy_vqa" / "stage3_stgc" / "checkpoints" / "last.ckpt"
    monkeypatch.chdir(ROOT)
    args = stage3_stgc(easy_vqa_dir, tmp_path, EPOCHS, "--trainer.limit_val_batches=null")
    cli = stgc(["validate", *args, f"--ckpt_path={checkpoint}"])
    single = cli.trainer.callback_metrics
    assert float(single["val/vqa_acc"]) == pytest.approx(ranks[0]["metrics"]["val/vqa_acc"], abs=1e-6)
    assert float(single["val/loss"]) == pytest.approx(ranks[0]["metrics"]["val/loss"], abs=1e-4)


def test_only_rank_zero_writes_logs_and_checkpoints(ddp_run) -> None:
    log_root, _ = ddp_run
    events = sorted(p.relative_to(log_root) for p in log_root.rglob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].parts[:2] == ("easy_vqa", "stage3_stgc")
    checkpoints = sorted(p.name for p in (log_root / "easy_vqa" / "stage3_stgc" / "checkpoints").iterdir())
    assert checkpoints == ["best.ckpt", "last.ckpt"]


@pytest.mark.parametrize("val_records", ["one", "good_and_broken"])
def test_validation_under_ddp_when_a_rank_has_nothing_to_score(val_records, easy_vqa_dir, tmp_path) -> None:
    """One val record (rank 1's share is empty), or rank 1's only record has broken pixel data: every
    rank still runs the evaluation and its all-gathers, and the logged accuracy is rank 0's answers'."""
    import shutil
    import subprocess

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from support.fit import ENV

    record = json.loads((easy_vqa_dir / "instruct_train.json").read_text())[0]
    images = tmp_path / "images"
    (images / Path(record["image"]).parent).mkdir(parents=True)
    shutil.copy(easy_vqa_dir / "images" / record["image"], images / record["image"])
    records = [record]
    if val_records == "good_and_broken":
        (images / "broken.png").write_bytes((images / record["image"]).read_bytes()[:60])
        records.append({**record, "id": "broken", "image": "broken.png"})
    val_json = tmp_path / "val.json"
    val_json.write_text(json.dumps(records))
    args = stage3_stgc(easy_vqa_dir, tmp_path / "logs", 1)
    args += [
        "-c", "configs/trainer/ddp.yaml", "--trainer.accelerator=cpu", "--trainer.devices=2",
        f"--data.init_args.val_json={val_json}", f"--data.init_args.image_folder={images}",
        "--trainer.limit_val_batches=null",
    ]  # fmt: skip
    # the train file's records name images under easy_vqa's folder: validate reads only val_json's
    result = subprocess.run(
        [sys.executable, "-m", "stgc", "validate", *args],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    events = next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent
    accuracy = EventAccumulator(str(events)).Reload().Scalars("val/vqa_acc")
    assert len(accuracy) == 1 and 0.0 <= accuracy[0].value <= 1.0


def test_predict_under_ddp_writes_the_same_answers_file_as_one_process(
    ddp_run, easy_vqa_dir, tmp_path
) -> None:
    """5 test records (an odd count, so the sampler pads one rank): the 2-process answers file is complete,
    in file order, without the padding's repeat, and equal to a single process's, line for line."""
    log_root, _ = ddp_run
    checkpoint = log_root / "easy_vqa" / "stage3_stgc" / "checkpoints" / "last.ckpt"
    records = json.loads((easy_vqa_dir / "instruct_test.json").read_text())[:5]
    test_json = tmp_path / "test.json"
    test_json.write_text(json.dumps(records))
    answers = {}
    for processes in (1, 2):
        path = tmp_path / f"answers{processes}.jsonl"
        args = stage3_stgc(easy_vqa_dir, tmp_path / f"logs{processes}", 1)
        args += [
            "-c", "configs/trainer/ddp.yaml", "--trainer.accelerator=cpu", f"--trainer.devices={processes}",
            f"--data.init_args.test_json={test_json}", f"--ckpt_path={checkpoint}", f"--answers.path={path}",
        ]  # fmt: skip
        run([sys.executable, "-m", "stgc", "predict", *args])
        answers[processes] = path.read_text().splitlines()
        assert not list(tmp_path.glob(f"{path.name}.rank*"))  # the shares are merged and removed
    assert answers[2] == answers[1]
    assert [json.loads(line)["id"] for line in answers[1]] == [r["id"] for r in records]
