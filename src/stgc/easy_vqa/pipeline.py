"""The easy-vqa pipeline, stage by stage: which config files and links each `stgc fit` gets.

Run from the repository root (configs/ is read from there). Stage 0 CLIP-pretrains the vision
tower and exports `clip.pt`, which stage I loads; the text warm-up, II and III start from the previous
stage's last checkpoint. Logs and checkpoints go to <log_root>/easy_vqa/<stage>/, beside
`pipeline.json`: the settings the stage was last fitted with (its `stgc fit` arguments and the text of
its config files), whether that fit finished, its wall time and final val metrics. A rerun uses it
to keep finished stages and to resume an interrupted one from its last.ckpt (`stage_state`).
"""

import json
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from stgc.cli import run as stgc

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


def run_folder(log_root: str | Path, stage: str) -> Path:
    """Where a stage's logs, checkpoints and pipeline.json go."""
    return Path(log_root) / "easy_vqa" / stage


def last_checkpoint(log_root: str | Path, stage: str) -> Path:
    return run_folder(log_root, stage) / "checkpoints" / "last.ckpt"


def stage_args(stage: str, log_root: str | Path) -> list[str]:
    """Config files of a stage, with its outputs under log_root (stage 0 has no LVLM: no model.yaml)."""
    model = [] if stage == "stage0" else ["-c", str(CONFIGS / "easy_vqa" / "model.yaml")]
    return [
        "-c", str(CONFIGS / "trainer.yaml"), *model, "-c", str(CONFIGS / "easy_vqa" / STAGES[stage]),
        f"--trainer.logger.init_args.save_dir={log_root}",
    ]  # fmt: skip


def fit_args(stage: str, log_root: str | Path, previous: str | None, extra: list[str]) -> list[str]:
    """`stgc fit` arguments of one stage, linked to what the previous stage wrote (extra arguments
    come before the links, so they cannot unlink the stages)."""
    clip = run_folder(log_root, "stage0") / "clip.pt"
    if stage == "stage0":
        links = [f"--model.init_args.export_path={clip}"]
    elif stage == "stage1":
        links = [f"--model.init_args.vision_pretrained={clip}"]
    else:
        links = [f"--model.init_args.init_from={last_checkpoint(log_root, previous)}"] if previous else []
    return ["fit", *stage_args(stage, log_root), *extra, *links]


def settings(args: list[str]) -> dict[str, Any]:
    """What a fit depends on besides the data: its arguments and the text of the config files they name."""
    configs = {
        path: Path(path).read_text() for flag, path in zip(args, args[1:], strict=False) if flag == "-c"
    }
    return {"args": args, "configs": configs}


def stage_record(log_root: str | Path, stage: str) -> dict[str, Any] | None:
    """The stage's pipeline.json, or None when it has none."""
    path = run_folder(log_root, stage) / "pipeline.json"
    return json.loads(path.read_text()) if path.is_file() else None


@rank_zero_only
def _write_record(log_root: str | Path, stage: str, record: dict[str, Any]) -> None:
    path = run_folder(log_root, stage) / "pipeline.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(record, indent=1) + "\n")
    path.with_suffix(".tmp").replace(path)  # a kill never leaves half a record


def stage_state(stage: str, log_root: str | Path, previous: str | None, extra: list[str]) -> str:
    """ "finished" when the stage's last fit had these settings and finished; "interrupted" when it
    had them, did not finish and left a last.ckpt (written at an epoch end: resumes exactly);
    "new" otherwise."""
    record = stage_record(log_root, stage)
    if record is None or record["settings"] != settings(fit_args(stage, log_root, previous, extra)):
        return "new"
    if record["finished"]:
        return "finished"
    return "interrupted" if last_checkpoint(log_root, stage).is_file() else "new"


def fit_stage(
    stage: str, log_root: str | Path, previous: str | None, extra: list[str], resume: bool = False
) -> LightningCLI:
    """`stgc fit` one stage, recording its settings first and its end in pipeline.json. With `resume`
    it continues from the stage's last.ckpt; without, a last.ckpt left by an earlier fit is removed
    first, so that a later rerun cannot resume from a checkpoint of other settings."""
    args = fit_args(stage, log_root, previous, extra)
    checkpoint = last_checkpoint(log_root, stage)
    if not resume and rank_zero_only.rank == 0:
        checkpoint.unlink(missing_ok=True)
    record = {"settings": settings(args), "finished": False}
    _write_record(log_root, stage, record)
    start = time.perf_counter()
    cli = stgc([*args, f"--ckpt_path={checkpoint}"] if resume else args)
    if cli.trainer.state.status == TrainerStatus.FINISHED and not cli.trainer.interrupted:
        wall_s = round(time.perf_counter() - start, 1)
        _write_record(
            log_root, stage, record | {"finished": True, "wall_s": wall_s, "val": metrics(cli, "val/")}
        )
    return cli


def test_stage(stage: str, log_root: str | Path, extra: list[str]) -> LightningCLI:
    """`stgc test` a stage's last checkpoint on the test split."""
    return stgc(
        ["test", *stage_args(stage, log_root), f"--ckpt_path={last_checkpoint(log_root, stage)}", *extra]
    )


def metrics(cli: LightningCLI, prefix: str) -> dict[str, float]:
    """The run's final logged metrics under `prefix` (e.g. "val/")."""
    items = sorted(cli.trainer.callback_metrics.items())
    return {key: round(float(value), 4) for key, value in items if key.startswith(prefix)}
