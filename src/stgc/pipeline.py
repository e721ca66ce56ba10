"""The easy-vqa pipeline, stage by stage: which config files and links each `stgc fit` gets.

Run from the repository root (configs/ is read from there). Stage 0 CLIP-pretrains the vision
tower and exports `clip.pt`, which stage I loads; the text warm-up, II and III start from the previous
stage's last checkpoint. Logs and checkpoints go to <log_root>/easy_vqa/<stage>/.
"""

from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI
from omegaconf import OmegaConf

from stgc.cli import main as stgc

CONFIGS = Path("configs")
STAGES = {
    "stage0": "stage0_clip.yaml",
    "stage1": "stage1_pretrain.yaml",
    "stage2_text": "stage2_text.yaml",
    "stage2": "stage2_finetune.yaml",
    "stage3": "stage3_moe.yaml",
}


def stage_data_args(stage: str) -> dict[str, Any]:
    """The DataModule init_args a stage's config file sets (for scripts that rebuild its data)."""
    config = OmegaConf.load(CONFIGS / "easy_vqa" / STAGES[stage])
    return OmegaConf.to_container(config.data.init_args)


def last_checkpoint(log_root: str | Path, stage: str) -> Path:
    return Path(log_root) / "easy_vqa" / stage / "checkpoints" / "last.ckpt"


def stage_args(stage: str, log_root: str | Path) -> list[str]:
    """Config files of a stage, with its outputs under log_root (stage 0 has no LVLM: no model.yaml)."""
    model = [] if stage == "stage0" else ["-c", str(CONFIGS / "easy_vqa" / "model.yaml")]
    return [
        "-c", str(CONFIGS / "trainer.yaml"), *model, "-c", str(CONFIGS / "easy_vqa" / STAGES[stage]),
        f"--trainer.logger.init_args.save_dir={log_root}",
    ]  # fmt: skip


def fit_stage(stage: str, log_root: str | Path, previous: str | None, extra: list[str]) -> LightningCLI:
    """`stgc fit` one stage, linked to what the previous stage wrote."""
    clip = Path(log_root) / "easy_vqa" / "stage0" / "clip.pt"
    if stage == "stage0":
        links = [f"--model.init_args.export_path={clip}"]
    elif stage == "stage1":
        links = [f"--model.init_args.vision_pretrained={clip}"]
    else:
        links = [f"--model.init_args.init_from={last_checkpoint(log_root, previous)}"] if previous else []
    return stgc(["fit", *stage_args(stage, log_root), *links, *extra])


def test_stage(stage: str, log_root: str | Path, extra: list[str]) -> LightningCLI:
    """`stgc test` a stage's last checkpoint on the test split."""
    return stgc(
        ["test", *stage_args(stage, log_root), f"--ckpt_path={last_checkpoint(log_root, stage)}", *extra]
    )


def metrics(cli: LightningCLI, prefix: str) -> dict[str, float]:
    """The run's final logged metrics under `prefix` (e.g. "val/")."""
    items = sorted(cli.trainer.callback_metrics.items())
    return {key: round(float(value), 4) for key, value in items if key.startswith(prefix)}
