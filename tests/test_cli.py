"""End to end through the CLI, on a slice: `stgc fit` stages 0 -> I -> II (text, then images) -> III
(+ STGC), then validate/test."""

import json
import runpy
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stgc.cli import run as stgc
from stgc.pipeline import stage_data_args
from support.tiny import TINY_LM as TINY_LM_CONFIG

ROOT = Path(__file__).resolve().parents[1]
TINY_LM = json.dumps(TINY_LM_CONFIG)


def _args(config: str, data_dir: Path, log_root: Path) -> list[str]:
    """A stage's config files (stage 0 has no LVLM), pointed at the slice, with tiny budgets."""
    is_clip = config.startswith("stage0")
    prefix = "pretrain" if config.startswith(("stage0", "stage1")) else "instruct"
    prefix += "_text" if config.startswith("stage2_text") else ""
    model = [] if is_clip else ["-c", str(ROOT / "configs" / "easy_vqa" / "model.yaml")]
    lm = [] if is_clip else [f"--model.init_args.lm_config={TINY_LM}"]
    configs = [
        "-c",
        str(ROOT / "configs" / "trainer.yaml"),
        *model,
        "-c",
        str(ROOT / "configs" / "easy_vqa" / config),
    ]
    data = [
        f"--data.init_args.train_json={data_dir / f'{prefix}_train.json'}",
        f"--data.init_args.test_json={data_dir / f'{prefix}_test.json'}",
        f"--data.init_args.image_folder={data_dir / 'images'}",
        "--data.init_args.limit_records=40",
        "--data.init_args.val_fraction=0.3",  # easy-vqa instruct: 2 of the 5 images, every question type
        "--data.init_args.batch_size=8",
        "--data.init_args.eval_batch_size=16",
    ]
    budget = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.log_every_n_steps=1"]
    return [
        *configs,
        f"--model.init_args.tokenizer={data_dir / 'tokenizer'}",
        *lm,
        *data,
        *budget,
        f"--trainer.logger.init_args.save_dir={log_root}",
    ]


def _scalars(log_dir: Path) -> set[str]:
    return set(EventAccumulator(str(log_dir)).Reload().Tags()["scalars"])


@pytest.fixture(scope="module")
def pipeline(easy_vqa_dir, tmp_path_factory):
    """Stages 0, I, II (text warm-up, then images) and III with STGC added from the command line;
    returns the log root."""
    log_root = tmp_path_factory.mktemp("logs")
    clip = log_root / "clip.pt"
    stgc(["fit", *_args("stage0_clip.yaml", easy_vqa_dir, log_root), f"--model.init_args.export_path={clip}"])
    stage1_args = _args("stage1_pretrain.yaml", easy_vqa_dir, log_root)
    stgc(["fit", *stage1_args, f"--model.init_args.vision_pretrained={clip}"])
    stage1 = log_root / "easy_vqa" / "stage1" / "checkpoints" / "last.ckpt"
    stgc(["fit", *_args("stage2_text.yaml", easy_vqa_dir, log_root), f"--model.init_args.init_from={stage1}"])
    text = log_root / "easy_vqa" / "stage2_text" / "checkpoints" / "last.ckpt"
    stgc(
        ["fit", *_args("stage2_finetune.yaml", easy_vqa_dir, log_root), f"--model.init_args.init_from={text}"]
    )
    stage2 = log_root / "easy_vqa" / "stage2" / "checkpoints" / "last.ckpt"
    stage3_args = _args("stage3_moe.yaml", easy_vqa_dir, log_root) + [f"--model.init_args.init_from={stage2}"]
    stgc_callback = [
        "--trainer.callbacks+=stgc.STGC",
        "--trainer.callbacks.loss_weight=0.05",
        "--trainer.callbacks.histogram_every_n_steps=1",
    ]
    stgc(["fit", *stage3_args, *stgc_callback])
    return log_root


def test_stage0_exports_a_clip_checkpoint_that_stage1_loads(pipeline) -> None:
    assert (pipeline / "clip.pt").is_file()
    assert {"train/clip_loss", "val/clip_loss", "val/retrieval_acc"} <= _scalars(
        pipeline / "easy_vqa" / "stage0"
    )
    stage1 = (pipeline / "easy_vqa" / "stage1" / "config.yaml").read_text()
    assert f"vision_pretrained: {pipeline / 'clip.pt'}" in stage1


def test_each_stage_writes_checkpoints_and_metrics(pipeline) -> None:
    for stage in ("stage1", "stage2_text", "stage2", "stage3"):
        run = pipeline / "easy_vqa" / stage
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert (run / "config.yaml").is_file()
        assert {"train/loss", "val/loss", "val/ppl"} <= _scalars(run)
    for stage in ("stage0", "stage1", "stage2_text", "stage2", "stage3"):  # configs/trainer.yaml's logger
        assert "hp_metric" not in _scalars(pipeline / "easy_vqa" / stage), (
            f"{stage} logs a placeholder hp_metric"
        )
    assert (pipeline / "easy_vqa" / "stage2" / "checkpoints" / "best.ckpt").is_file()  # best val/vqa_acc
    stage2 = _scalars(pipeline / "easy_vqa" / "stage2")
    assert {"val/vqa_acc", "val/vqa_acc_yes_no", "val/vqa_acc_color", "val/vqa_acc_shape"} <= stage2


def test_stage3_logs_routing_and_stgc_statistics(pipeline) -> None:
    scalars = _scalars(pipeline / "easy_vqa" / "stage3")
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


def test_scripts_rebuild_the_prompt_layout_stage2_trained_with(pipeline) -> None:
    """scripts/ (ask, vqa_errors, ...) read stage II's data settings from its config file."""
    trained = OmegaConf.load(pipeline / "easy_vqa" / "stage2" / "config.yaml").data.init_args
    read = stage_data_args("stage2")
    assert (read["system_prompt"], read["max_length"]) == (trained.system_prompt, trained.max_length)


def test_validate_and_test_a_checkpoint(pipeline, easy_vqa_dir) -> None:
    checkpoint = pipeline / "easy_vqa" / "stage2" / "checkpoints" / "last.ckpt"
    args = _args("stage2_finetune.yaml", easy_vqa_dir, pipeline) + [
        f"--ckpt_path={checkpoint}",
        "--model.init_args.init_from=null",
    ]
    validated = stgc(["validate", *args])
    assert {"val/loss", "val/vqa_acc"} <= set(validated.trainer.callback_metrics)
    tested = stgc(["test", *args, "--trainer.limit_test_batches=2"])
    assert 0.0 <= float(tested.trainer.callback_metrics["test/vqa_acc"]) <= 1.0


def test_ask_answers_a_question_about_an_image(pipeline, easy_vqa_dir, monkeypatch, capsys) -> None:
    checkpoint = pipeline / "easy_vqa" / "stage3" / "checkpoints" / "last.ckpt"
    image = next((easy_vqa_dir / "images" / "test").glob("*.png"))
    monkeypatch.setattr(sys, "argv", ["ask.py", str(checkpoint), str(image), "what shape is this?"])
    runpy.run_path(str(ROOT / "scripts" / "ask.py"), run_name="__main__")
    assert capsys.readouterr().out.count("\n") == 1  # one answer line (a barely trained model may say little)
