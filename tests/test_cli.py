"""End to end through the CLI, on a slice: the easy-vqa pipeline's `fit_stage` runs stages 0 -> I ->
II (text, then images) -> III (with STGC, and its λ = 0 baseline) as `make train` does, then
validate/test."""

import json
import runpy
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stgc.cli import run as stgc
from stgc_experiments.pipeline import STAGES, fit_stage, source, stage_args, stage_data_args
from support.tiny import TINY_LM as TINY_LM_CONFIG

ROOT = Path(__file__).resolve().parents[1]
TINY_LM = json.dumps(TINY_LM_CONFIG)
STGC_EVERY_STEP = ["--trainer.callbacks.histogram_every_n_steps=1"]  # the configs' STGC: histograms each step


def _slice(stage: str, data_dir: Path) -> list[str]:
    """Arguments that point a stage at its files in data_dir, with a tiny LM and budget."""
    files = stage_data_args(stage)
    lm = [] if stage == "stage0" else [f"--model.init_args.lm_config={TINY_LM}"]
    return [
        f"--model.init_args.tokenizer={data_dir / 'tokenizer'}",
        *lm,
        f"--data.init_args.train_json={data_dir / Path(files['train_json']).name}",
        f"--data.init_args.test_json={data_dir / Path(files['test_json']).name}",
        f"--data.init_args.image_folder={data_dir / 'images'}",
        "--data.init_args.limit_records=40",
        "--data.init_args.val_fraction=0.3",  # easy-vqa instruct: 2 of the 5 images, every question type
        "--data.init_args.batch_size=8",
        "--data.init_args.eval_batch_size=16",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.log_every_n_steps=1",
    ]


def _scalars(log_dir: Path) -> set[str]:
    return set(EventAccumulator(str(log_dir)).Reload().Tags()["scalars"])


@pytest.fixture(scope="module")
def pipeline(easy_vqa_dir, tmp_path_factory):
    """Every stage in order through the pipeline's fit_stage (its links between stages), both stage III
    arms from the same stage II; returns the log root."""
    log_root = tmp_path_factory.mktemp("logs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(log_root)  # not the repository root: the pipeline runs `stgc` there itself
        for stage in STAGES:
            extra = _slice(stage, easy_vqa_dir) + (STGC_EVERY_STEP if stage.startswith("stage3") else [])
            fit_stage(stage, log_root, source(stage), extra)
    return log_root


def test_stage0_exports_a_clip_checkpoint_that_stage1_loads(pipeline) -> None:
    clip = pipeline / "easy_vqa" / "stage0" / "clip.pt"
    assert clip.is_file()
    assert {"train/clip_loss", "val/clip_loss", "val/retrieval_acc"} <= _scalars(
        pipeline / "easy_vqa" / "stage0"
    )
    stage1 = (pipeline / "easy_vqa" / "stage1" / "config.yaml").read_text()
    assert f"vision_pretrained: {clip}" in stage1


def test_each_stage_starts_from_the_last_checkpoint_of_the_one_before(pipeline) -> None:
    links = (
        ("stage1", "stage2_text"),
        ("stage2_text", "stage2"),
        ("stage2", "stage3_stgc"),
        ("stage2", "stage3_baseline"),
    )
    for before, stage in links:
        trained = OmegaConf.load(pipeline / "easy_vqa" / stage / "config.yaml").model.init_args
        assert trained.init_from == str(pipeline / "easy_vqa" / before / "checkpoints" / "last.ckpt")


def test_each_stage_writes_checkpoints_and_metrics(pipeline) -> None:
    for stage in ("stage1", "stage2_text", "stage2", "stage3_stgc", "stage3_baseline"):
        run = pipeline / "easy_vqa" / stage
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert (run / "config.yaml").is_file()
        assert {"train/loss", "val/loss", "val/ppl"} <= _scalars(run)
    for stage in STAGES:  # configs/trainer.yaml's logger
        assert "hp_metric" not in _scalars(pipeline / "easy_vqa" / stage), (
            f"{stage} logs a placeholder hp_metric"
        )
    assert (pipeline / "easy_vqa" / "stage2" / "checkpoints" / "best.ckpt").is_file()  # best val/vqa_acc
    stage2 = _scalars(pipeline / "easy_vqa" / "stage2")
    assert {"val/vqa_acc", "val/vqa_acc_yes_no", "val/vqa_acc_color", "val/vqa_acc_shape"} <= stage2


@pytest.mark.parametrize("arm", ["stage3_stgc", "stage3_baseline"])
def test_both_stage3_arms_log_routing_and_stgc_statistics(pipeline, arm) -> None:
    """make train's two TensorBoard runs: STGC and the baseline that measures the same statistics."""
    run = pipeline / "easy_vqa" / arm
    scalars = _scalars(run)
    expected = {
        "train/aux_loss",
        "moe/layer_0/aux_loss",
        "moe/layer_0/entropy",
        "moe/layer_0/load/expert_3",
        "moe/layer_0/load_image/expert_0",
        "moe/layer_0/load_text/expert_0",
        "stgc/conflict_ratio/all",
        "stgc/cosine_mean/layer_0",
        "stgc/cosine_std/all",
        "stgc/cel_loss/all",
        "stgc/conflict_ratio_image/layer_0",
        "stgc/conflict_ratio_text/layer_0",
        "stgc/expert_conflict_ratio/layer_0/expert_1",
        "stgc/expert_load/layer_0/expert_2",
    }
    assert expected <= scalars, sorted(expected - scalars)
    images = set(EventAccumulator(str(run)).Reload().Tags()["images"])
    assert {"stgc/conflict_ratio_heatmap", "stgc/conflict_picture"} <= images, sorted(images)
    callback = OmegaConf.load(run / "config.yaml").trainer.callbacks[-1]
    assert callback.class_path == "stgc.STGC"
    assert callback.init_args.loss_weight == (0.0 if arm == "stage3_baseline" else 0.1)


def test_scripts_rebuild_the_prompt_layout_stage2_trained_with(pipeline) -> None:
    """scripts/ask.py reads stage II's data settings from its config file."""
    trained = OmegaConf.load(pipeline / "easy_vqa" / "stage2" / "config.yaml").data.init_args
    read = stage_data_args("stage2")
    assert (read["system_prompt"], read["max_length"]) == (trained.system_prompt, trained.max_length)


def test_validate_and_test_a_checkpoint(pipeline, easy_vqa_dir, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    checkpoint = pipeline / "easy_vqa" / "stage2" / "checkpoints" / "last.ckpt"
    args = (
        stage_args("stage2", pipeline)
        + _slice("stage2", easy_vqa_dir)
        + [
            f"--ckpt_path={checkpoint}",
            "--model.init_args.init_from=null",
        ]
    )
    validated = stgc(["validate", *args])
    assert {"val/loss", "val/vqa_acc"} <= set(validated.trainer.callback_metrics)
    tested = stgc(["test", *args, "--trainer.limit_test_batches=2"])
    assert 0.0 <= float(tested.trainer.callback_metrics["test/vqa_acc"]) <= 1.0


def test_ask_answers_a_question_about_an_image(pipeline, easy_vqa_dir, monkeypatch, capsys) -> None:
    checkpoint = pipeline / "easy_vqa" / "stage3_stgc" / "checkpoints" / "last.ckpt"
    image = next((easy_vqa_dir / "images" / "test").glob("*.png"))
    monkeypatch.setattr(sys, "argv", ["ask.py", str(checkpoint), str(image), "what shape is this?"])
    runpy.run_path(str(ROOT / "scripts" / "ask.py"), run_name="__main__")
    assert capsys.readouterr().out.count("\n") == 1  # one answer line (a barely trained model may say little)
