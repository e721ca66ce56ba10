"""The stage pipelines, stage by stage: which config files and links each `stgc fit` gets. Two
pipelines share the stage names and the code: easy-vqa (`make train`, configs/easy_vqa/) and the mix
of easy-vqa, Sort-of-CLEVR and its text-only family (`make train-mix`, configs/mix/); PIPELINES
names each one's model config files.

Independent of the working directory: configs/, the paths the stage configs give (data/, logs/) and
a relative log_root are the repository root's (ROOT); `stgc_at_root` runs every `stgc` there,
and the recorded arguments keep those paths relative. The stage chain is written once, in
the stage config files: a stage's model paths under the logger's folder (`logs/<pipeline>/<stage>/...`)
name what it starts from (stage I: stage 0's `clip.pt`; the text warm-up, II and III: the previous
stage's last checkpoint) and what it writes (stage 0: `clip.pt`). `source()` and `chain()` read
them; `fit_args()` moves them under another log root. Logs and checkpoints go to
<log_root>/<pipeline>/<stage>/, beside `pipeline.json`: the settings the stage was last fitted with
(its `stgc fit` arguments and the text of its config files), whether that fit finished, its wall
time and final val metrics. A rerun uses it to keep finished stages and to resume an interrupted
one from its last.ckpt (`stage_state`).
"""

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stgc.cli import run as stgc
from stgc.method import names
from stgc_experiments import ROOT
from stgc_experiments.study import late_mean, layer_curves

CONFIGS = Path("configs")  # under ROOT; relative in the `stgc` arguments, which run there
DEFAULT = "easy_vqa"  # the pipeline of `make train`
PIPELINES = {  # pipeline -> its LVLM's config files under configs/; its stage files are in configs/<pipeline>/
    "easy_vqa": ("easy_vqa/model.yaml",),
    "mix": ("easy_vqa/model.yaml", "mix/model.yaml"),  # easy-vqa's LVLM with the tokenizer of both datasets
}
STAGES = {  # stage (its logger version) -> its config files under configs/<pipeline>/, in training order
    "stage0": ("stage0_clip.yaml",),
    "stage1": ("stage1_pretrain.yaml",),
    "stage2_text": ("stage2_text.yaml",),
    "stage2": ("stage2_finetune.yaml",),
    "stage3_stgc": ("stage3_moe.yaml", "stage3_moe_stgc.yaml"),  # the MoE recipe with STGC: the final model
    "stage3_baseline": ("stage3_moe.yaml", "stage3_moe_baseline.yaml"),  # beside it, STGC measuring (λ = 0)
}
TESTED = ("stage2", "stage3_stgc", "stage3_baseline")  # the dense model and stage III's two arms


def stgc_at_root(args: list[str]) -> LightningCLI:
    """`stgc <args>` run at ROOT, where the relative paths of the configs and arguments point."""
    with contextlib.chdir(ROOT):
        return stgc(args)


def stage_config(stage: str, *, pipeline: str = DEFAULT) -> DictConfig:
    """A stage's config, its files merged in order (a later file's lists replace, as in LightningCLI)."""
    return OmegaConf.merge(*(OmegaConf.load(ROOT / CONFIGS / pipeline / name) for name in STAGES[stage]))


def stage_data_args(stage: str, *, pipeline: str = DEFAULT) -> dict[str, Any]:
    """The DataModule init_args a stage's config file sets (for scripts that rebuild its data)."""
    return OmegaConf.to_container(stage_config(stage, pipeline=pipeline).data.init_args)


def stage_paths(stage: str, *, pipeline: str = DEFAULT) -> dict[str, tuple[str, Path]]:
    """The stage's model paths inside a stage's run folder, as its config file gives them:
    {model init_args key: (the stage whose folder holds it, the path inside that folder)}."""
    config = stage_config(stage, pipeline=pipeline)
    logger = config.trainer.logger.init_args
    runs = Path(logger.save_dir) / logger.name  # logs/easy_vqa: where the stages' run folders are
    paths = {}
    for key, value in config.model.init_args.items():
        if isinstance(value, str) and Path(value).is_relative_to(runs):
            owner, *inside = Path(value).relative_to(runs).parts
            if owner not in STAGES:
                raise ValueError(f"{STAGES[stage][0]}: model.init_args.{key}={value} is in no stage's folder")
            paths[key] = (owner, Path(*inside))
    return paths


def source(stage: str, *, pipeline: str = DEFAULT) -> str | None:
    """The stage whose output this stage starts from (None: the first stage)."""
    owners = {owner for owner, _ in stage_paths(stage, pipeline=pipeline).values() if owner != stage}
    if len(owners) > 1:
        raise ValueError(f"{STAGES[stage][0]} starts from several stages: {sorted(owners)}")
    return next(iter(owners), None)


def chain(stage: str, *, pipeline: str = DEFAULT) -> list[str]:
    """The stages that lead to `stage` and the stage itself, first to last."""
    stages = [stage]
    while (before := source(stages[0], pipeline=pipeline)) is not None:
        stages.insert(0, before)
    return stages


def _cli_folder(log_root: str | Path, stage: str, pipeline: str) -> Path:
    """A stage's run folder as `stgc`, run at ROOT, is told it (relative when log_root is)."""
    return Path(log_root) / pipeline / stage


def run_folder(log_root: str | Path, stage: str, *, pipeline: str = DEFAULT) -> Path:
    """Where a stage's logs, checkpoints and pipeline.json go, on disk (a relative log_root is ROOT's)."""
    return ROOT / _cli_folder(log_root, stage, pipeline)


def last_checkpoint(log_root: str | Path, stage: str, *, pipeline: str = DEFAULT) -> Path:
    """The stage's last.ckpt: what a rerun resumes from and the next stage starts from."""
    return run_folder(log_root, stage, pipeline=pipeline) / "checkpoints" / "last.ckpt"


def stage_args(stage: str, log_root: str | Path, *, pipeline: str = DEFAULT) -> list[str]:
    """Config files of a stage, with its outputs under log_root (stage 0 has no LVLM: no model.yaml)."""
    model = (
        [] if stage == "stage0" else [arg for f in PIPELINES[pipeline] for arg in ("-c", str(CONFIGS / f))]
    )
    own = [arg for name in STAGES[stage] for arg in ("-c", str(CONFIGS / pipeline / name))]
    return [
        "-c",
        str(CONFIGS / "trainer.yaml"),
        *model,
        *own,
        f"--trainer.logger.init_args.save_dir={log_root}",
    ]


def fit_args(
    stage: str, log_root: str | Path, previous: str | None, extra: list[str], *, pipeline: str = DEFAULT
) -> list[str]:
    """`stgc fit` arguments of one stage, its config's paths moved under log_root: what it writes,
    and what it starts from when that is what `previous` (the stage fitted before it) wrote; extra
    arguments come before these links, so they cannot unlink the stages."""
    links = [
        f"--model.init_args.{key}={_cli_folder(log_root, owner, pipeline) / inside}"
        for key, (owner, inside) in stage_paths(stage, pipeline=pipeline).items()
        if owner in (stage, previous)
    ]
    return ["fit", *stage_args(stage, log_root, pipeline=pipeline), *extra, *links]


def settings(args: list[str]) -> dict[str, Any]:
    """What a fit depends on besides the data: its arguments and the text of the config files they name
    (a relative path is ROOT's)."""
    configs = {
        path: (ROOT / path).read_text() for flag, path in zip(args, args[1:], strict=False) if flag == "-c"
    }
    return {"args": args, "configs": configs}


def stage_record(log_root: str | Path, stage: str, *, pipeline: str = DEFAULT) -> dict[str, Any] | None:
    """The stage's pipeline.json, or None when it has none."""
    path = run_folder(log_root, stage, pipeline=pipeline) / "pipeline.json"
    return json.loads(path.read_text()) if path.is_file() else None


@rank_zero_only
def _write_record(log_root: str | Path, stage: str, record: dict[str, Any], pipeline: str) -> None:
    path = run_folder(log_root, stage, pipeline=pipeline) / "pipeline.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(record, indent=1) + "\n")
    path.with_suffix(".tmp").replace(path)  # a kill never leaves half a record


def stage_state(
    stage: str, log_root: str | Path, previous: str | None, extra: list[str], *, pipeline: str = DEFAULT
) -> str:
    """ "finished" when the stage's last fit had these settings and finished; "interrupted" when it
    had them, did not finish and left a last.ckpt (written at an epoch end: resumes exactly);
    "new" otherwise."""
    record = stage_record(log_root, stage, pipeline=pipeline)
    args = fit_args(stage, log_root, previous, extra, pipeline=pipeline)
    if record is None or record["settings"] != settings(args):
        return "new"
    if record["finished"]:
        return "finished"
    return "interrupted" if last_checkpoint(log_root, stage, pipeline=pipeline).is_file() else "new"


def fit_stage(
    stage: str,
    log_root: str | Path,
    previous: str | None,
    extra: list[str],
    resume: bool = False,
    *,
    pipeline: str = DEFAULT,
) -> LightningCLI:
    """`stgc fit` one stage, recording its settings first and its end in pipeline.json. With `resume`
    it continues from the stage's last.ckpt; without, a last.ckpt left by an earlier fit is removed
    first, so that a later rerun cannot resume from a checkpoint of other settings."""
    args = fit_args(stage, log_root, previous, extra, pipeline=pipeline)
    checkpoint = last_checkpoint(log_root, stage, pipeline=pipeline)
    if not resume and rank_zero_only.rank == 0:
        checkpoint.unlink(missing_ok=True)
    record = {"settings": settings(args), "finished": False}
    _write_record(log_root, stage, record, pipeline)
    start = time.perf_counter()
    cli = stgc_at_root([*args, f"--ckpt_path={checkpoint}"] if resume else args)
    if cli.trainer.state.status == TrainerStatus.FINISHED and not cli.trainer.interrupted:
        wall_s = round(time.perf_counter() - start, 1)
        _write_record(
            log_root,
            stage,
            record | {"finished": True, "wall_s": wall_s, "val": metrics(cli, "val/")},
            pipeline,
        )
    return cli


def test_stage(
    stage: str, log_root: str | Path, extra: list[str], *, pipeline: str = DEFAULT
) -> LightningCLI:
    """`stgc test` a stage's last checkpoint on the test split."""
    checkpoint = last_checkpoint(log_root, stage, pipeline=pipeline)
    return stgc_at_root(
        ["test", *stage_args(stage, log_root, pipeline=pipeline), f"--ckpt_path={checkpoint}", *extra]
    )


def metrics(cli: LightningCLI, prefix: str) -> dict[str, float]:
    """The run's final logged metrics under `prefix` (e.g. "val/")."""
    items = sorted(cli.trainer.callback_metrics.items())
    return {key: round(float(value), 4) for key, value in items if key.startswith(prefix)}


LATE_CONFLICT_RATIO = f"{names.PREFIX}/{names.CONFLICT_RATIO}"  # its key in make train's report


def late_conflict_ratio(folder: str | Path) -> dict[str, float]:
    """{"stgc/conflict_ratio": ...}: a run's STGC conflict ratio averaged over the MoE layers and its
    last third of logged steps, from its TensorBoard events; {} for a run without STGC."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    curve = layer_curves(events, [names.CONFLICT_RATIO])[names.CONFLICT_RATIO]
    return {LATE_CONFLICT_RATIO: round(late_mean(curve, 1 / 3), 4)} if curve else {}
