"""`make train` after an interruption: scripts/train_easy_vqa.py, killed during a stage and run
again, keeps the stages that finished, resumes the interrupted one from its last.ckpt, and ends with
the weights of an uninterrupted run (stages II and III on a slice of easy-vqa, tiny LM)."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from stgc_experiments.pipeline import (
    STAGES,
    chain,
    fit_args,
    last_checkpoint,
    settings,
    source,
    stage_config,
    stage_state,
)
from support.fit import ROOT, run, run_until_stalled
from support.tiny import TINY_LM

SCRIPT = ROOT / "scripts" / "train_easy_vqa.py"


def pipeline(data_dir: Path, log_root: Path, marker: Path, *extra: str) -> list[str]:
    """train_easy_vqa.py over stages II and III's two arms, stalling once when stage III's second epoch
    starts (the stall callback is in both runs' arguments: the rerun's settings are the same)."""
    return [
        sys.executable, str(SCRIPT), "--stages", "stage2", "stage3_stgc", "stage3_baseline", "--log-root", str(log_root),
        "--model.init_args.init_from=null", f"--model.init_args.lm_config={json.dumps(TINY_LM)}",
        f"--model.init_args.tokenizer={data_dir / 'tokenizer'}",
        f"--data.init_args.train_json={data_dir / 'instruct_train.json'}",
        f"--data.init_args.test_json={data_dir / 'instruct_test.json'}",
        f"--data.init_args.image_folder={data_dir / 'images'}",
        "--data.init_args.limit_records=36", "--data.init_args.val_fraction=0.2",
        "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=8",
        "--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1", "--trainer.log_every_n_steps=1",
        "--trainer.callbacks+=support.faults.StallAtEpoch", "--trainer.callbacks.epoch=1",
        f"--trainer.callbacks.marker={marker}", "--trainer.callbacks.version=stage3_stgc", *extra,
    ]  # fmt: skip


def last(log_root: Path, stage: str) -> Path:
    return log_root / "easy_vqa" / stage / "checkpoints" / "last.ckpt"


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(easy_vqa_dir, tmp_path_factory) -> dict:
    log_root = tmp_path_factory.mktemp("uninterrupted")
    marker = log_root / "no-stall"
    marker.touch()
    run(pipeline(easy_vqa_dir, log_root, marker))
    return load(last(log_root, "stage3_stgc"))


@pytest.mark.slow  # a chain of stages run twice, ~40 s: make test-slow
def test_a_rerun_keeps_finished_stages_and_resumes_the_interrupted_one(
    easy_vqa_dir, tmp_path, uninterrupted
) -> None:
    marker = tmp_path / "stalled"
    command = pipeline(easy_vqa_dir, tmp_path, marker)
    run_until_stalled(command, marker)
    stage2 = tmp_path / "easy_vqa" / "stage2"

    def fitted() -> dict[Path, bytes]:  # what stage II's fit wrote (its test logs in stage2/test/)
        return {p: p.read_bytes() for p in stage2.rglob("*") if p.is_file() and p.parent.name != "test"}

    stage2_fit = fitted()
    interrupted = load(last(tmp_path, "stage3_stgc"))
    assert interrupted["epoch"] == 0 and 0 < interrupted["global_step"] < uninterrupted["global_step"]

    out = run(command).stdout
    assert "[stage2] kept: finished earlier with the same settings" in out
    assert f"[stage3_stgc] resuming from {last(tmp_path, 'stage3_stgc')} (end of epoch 0)" in out
    assert fitted() == stage2_fit  # not trained again
    assert "[stage3_baseline] kept" not in out  # it had not run: trained from the kept stage II
    baseline = (tmp_path / "easy_vqa" / "stage3_baseline" / "config.yaml").read_text()
    assert f"init_from: {last(tmp_path, 'stage2')}" in baseline
    assert '"stage3_baseline": {' in out[out.index('"test"') :]  # both arms tested
    for arm in ("stage3_stgc", "stage3_baseline"):  # the closing summary: test accuracy, conflict ratio
        assert re.search(rf"^{arm} +[01]\.\d{{4}}  [01]\.\d{{4}}$", out, re.MULTILINE), out[-600:]
    resumed = load(last(tmp_path, "stage3_stgc"))
    assert resumed["global_step"] == uninterrupted["global_step"]
    for key, value in uninterrupted["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)

    again = run(command).stdout  # everything finished: nothing trains
    assert "[stage2] kept" in again and "[stage3_stgc] kept" in again and "[stage3_baseline] kept" in again
    fresh = run([*command, "--fresh", "--stages", "stage2"]).stdout  # a later --stages wins: one stage
    assert "[stage2] {" in fresh and "kept" not in fresh and "resuming" not in fresh


def test_stage_state_reads_the_recorded_settings(tmp_path, monkeypatch) -> None:
    """finished with the same settings: kept; not finished with a last.ckpt: resumed; otherwise, or
    when an argument or a config file's text differs: trained from scratch."""
    monkeypatch.chdir(tmp_path)  # the pipeline reads configs/ from the repository root, not from here
    extra = ["--trainer.max_epochs=1"]
    record = {"settings": settings(fit_args("stage3_stgc", tmp_path, "stage2", extra)), "finished": True}
    folder = tmp_path / "easy_vqa" / "stage3_stgc"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "pipeline.json").write_text(json.dumps(record))
    assert stage_state("stage3_stgc", tmp_path, "stage2", extra) == "finished"
    assert stage_state("stage3_stgc", tmp_path, "stage2", ["--trainer.max_epochs=2"]) == "new"
    assert stage_state("stage3_stgc", tmp_path, None, extra) == "new"  # not linked to stage II's checkpoint
    record["settings"]["configs"]["configs/trainer.yaml"] += "# edited\n"
    (folder / "pipeline.json").write_text(json.dumps(record))
    assert stage_state("stage3_stgc", tmp_path, "stage2", extra) == "new"
    record = {"settings": settings(fit_args("stage3_stgc", tmp_path, "stage2", extra)), "finished": False}
    (folder / "pipeline.json").write_text(json.dumps(record))
    assert (
        stage_state("stage3_stgc", tmp_path, "stage2", extra) == "new"
    )  # killed before its first epoch ended
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert stage_state("stage3_stgc", tmp_path, "stage2", extra) == "interrupted"


def test_the_stage_chain_is_read_from_the_config_files(tmp_path, monkeypatch) -> None:
    """Each stage's config names what it starts from; `make train` runs them in that order, and a
    fit moves the links under its log root only when the stage it starts from ran just before."""
    monkeypatch.chdir(tmp_path)  # the pipeline reads configs/ from the repository root, not from here
    dense = ["stage0", "stage1", "stage2_text", "stage2"]
    assert chain("stage3_stgc") == [*dense, "stage3_stgc"] and chain("stage3_baseline") == [
        *dense,
        "stage3_baseline",
    ]
    assert [source(stage) for stage in STAGES] == [None, *dense, "stage2"]  # both arms from stage II
    assert all(stage_config(stage).trainer.logger.init_args.version == stage for stage in STAGES)
    stage1 = fit_args("stage1", tmp_path, "stage0", [])
    assert stage1[-1] == f"--model.init_args.vision_pretrained={tmp_path / 'easy_vqa' / 'stage0' / 'clip.pt'}"
    assert fit_args("stage0", tmp_path, None, [])[-1] == (
        f"--model.init_args.export_path={tmp_path / 'easy_vqa' / 'stage0' / 'clip.pt'}"
    )
    stage3 = fit_args("stage3_stgc", tmp_path, "stage2", [])
    assert (
        stage3[-1]
        == f"--model.init_args.init_from={tmp_path / 'easy_vqa' / 'stage2' / 'checkpoints' / 'last.ckpt'}"
    )
    assert not any("init_from" in arg for arg in fit_args("stage3_stgc", tmp_path, "stage1", []))


def test_relative_paths_are_the_repository_roots_and_recorded_relative(tmp_path, monkeypatch) -> None:
    """From any working directory a relative log root is the repository root's; the arguments that
    pipeline.json records keep it relative, so that a checkout elsewhere finds the same settings."""
    monkeypatch.chdir(tmp_path)
    assert (
        last_checkpoint("logs", "stage2")
        == ROOT / "logs" / "easy_vqa" / "stage2" / "checkpoints" / "last.ckpt"
    )
    args = fit_args("stage3_stgc", "logs", "stage2", [])
    assert args[-1] == "--model.init_args.init_from=logs/easy_vqa/stage2/checkpoints/last.ckpt"
    assert "--trainer.logger.init_args.save_dir=logs" in args
    configs = [
        "trainer.yaml",
        "easy_vqa/model.yaml",
        "easy_vqa/stage3_moe.yaml",
        "easy_vqa/stage3_moe_stgc.yaml",
    ]
    assert list(settings(args)["configs"]) == [f"configs/{name}" for name in configs]
