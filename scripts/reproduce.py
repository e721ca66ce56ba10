"""Does STGC reduce token gradient conflicts and help accuracy? Baseline MoE vs MoE + STGC on easy-vqa.

From one shared stage II checkpoint, every run trains stage III under the same budget:
  * baseline: the MoE with STGC in measuring mode (loss_weight 0), so both arms log the same statistics;
  * stgc: the MoE with STGC at the chosen (loss_weight, threshold);
each over --seeds seeds, plus a one-seed sweep of loss_weight × threshold. Choices are made on the
validation split carved from train; the test split is evaluated once per run, at its end.

    python scripts/reproduce.py            # the study (~60 min on 2 CPU cores)
    python scripts/reproduce.py --quick    # a tiny slice, to keep the script working (~3 min)

Finished runs are kept (results/runs/<run>.json) and skipped when the study is run again. Writes
results/*.png plots and results/results.md, which the README's "Results" section includes.
"""

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stgc.cli import main as stgc
from stgc.data.easy_vqa import prepare
from stgc.pipeline import fit_stage, last_checkpoint, stage_args

QUESTION_TYPES = ("yes_no", "color", "shape")
QUICK = [  # a tiny slice, model and budget: checks that the study runs end to end
    "--data.init_args.limit_records=48",
    "--data.init_args.val_fraction=0.25",
    "--data.init_args.batch_size=8",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_test_batches=2",
    "--trainer.log_every_n_steps=1",
]


@dataclass(frozen=True)
class Run:
    arm: str  # "baseline", "stgc" or "sweep"
    seed: int
    loss_weight: float
    threshold: float

    @property
    def name(self) -> str:
        return f"{self.arm}_lw{self.loss_weight:g}_tau{self.threshold:g}_seed{self.seed}"


def plan(args: argparse.Namespace) -> list[Run]:
    runs = [Run("baseline", seed, 0.0, 0.0) for seed in range(args.seeds)]
    runs += [Run("stgc", seed, args.loss_weight, args.threshold) for seed in range(args.seeds)]
    runs += [
        Run("sweep", 0, loss_weight, threshold)
        for loss_weight in args.sweep_loss_weights
        for threshold in args.sweep_thresholds
        if (loss_weight, threshold) != (args.loss_weight, args.threshold)
    ]
    return runs


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    if tag not in events.Tags()["scalars"]:
        return []
    return [(event.step, event.value) for event in events.Scalars(tag)]


def train_stage3(run: Run, args: argparse.Namespace, log_root: Path) -> dict:
    """One stage III fit with STGC at the run's settings, then one test of its last checkpoint."""
    stage3 = [
        *stage_args("stage3", log_root),
        f"--trainer.logger.init_args.version={run.name}",
        f"--seed_everything={run.seed}",
        f"--model.init_args.init_from={args.stage2}",
        *args.extra,
    ]
    callback = [
        "--trainer.callbacks+=stgc.STGC",
        f"--trainer.callbacks.loss_weight={run.loss_weight}",
        f"--trainer.callbacks.threshold={run.threshold}",
        "--trainer.callbacks.histogram_every_n_steps=0",
    ]
    start = time.perf_counter()
    fit = stgc(["fit", *stage3, *callback])
    wall = time.perf_counter() - start
    steps = fit.trainer.global_step
    checkpoint = log_root / "easy_vqa" / run.name / "checkpoints" / "last.ckpt"
    test = stgc(["test", *stage3, f"--ckpt_path={checkpoint}"])
    log_dir = log_root / "easy_vqa" / run.name
    curves = {
        tag: scalars(log_dir, f"stgc/{tag}/all") for tag in ("conflict_ratio", "cosine_mean", "cosine_std")
    }
    metrics = {
        k: float(v)
        for k, v in {**fit.trainer.callback_metrics, **test.trainer.callback_metrics}.items()
        if k.startswith(("val/", "test/"))
    }
    return {
        "run": run.__dict__,
        "steps": steps,
        "wall_s": wall,
        "step_s": wall / max(steps, 1),
        "metrics": metrics,
        "curves": curves,
        "final": {tag: statistics.fmean(v for _, v in curve[-3:]) for tag, curve in curves.items() if curve},
    }


def dense_stage2(args: argparse.Namespace, log_root: Path) -> dict:
    """The shared stage II model, validated and tested once (the dense row of the table)."""
    stage2 = [
        *stage_args("stage2", log_root),
        "--model.init_args.init_from=null",
        f"--ckpt_path={args.stage2}",
        "--trainer.logger.init_args.version=dense_stage2",
        *args.extra,
    ]
    metrics = {}
    for subcommand in ("validate", "test"):
        cli = stgc([subcommand, *stage2])
        metrics |= {
            k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith(("val/", "test/"))
        }
    return {"metrics": metrics}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict[str, dict], dense: dict) -> str:
    """The Markdown results table: accuracy, conflict ratio, gradient consistency, step time."""
    rows = [
        "| model | test acc | val acc | test yes/no | test color | test shape | conflict ratio | "
        "gradient consistency (cos mean) | step time (s) |",
        "|" + " --- |" * 9,
    ]
    dense_metrics = dense["metrics"]
    rows.append(
        f"| dense (stage II) | {dense_metrics['test/vqa_acc']:.3f} | {dense_metrics['val/vqa_acc']:.3f} | "
        + " | ".join(f"{dense_metrics.get(f'test/vqa_acc_{q}', float('nan')):.3f}" for q in QUESTION_TYPES)
        + " | – | – | – |"
    )
    for arm, label in (("baseline", "MoE baseline"), ("stgc", "MoE + STGC")):
        runs = [r for r in results.values() if r["run"]["arm"] == arm]
        if not runs:
            continue
        cells = [
            mean_std([r["metrics"][key] for r in runs])
            for key in ("test/vqa_acc", "val/vqa_acc", *(f"test/vqa_acc_{q}" for q in QUESTION_TYPES))
        ]
        cells += [mean_std([r["final"][tag] for r in runs]) for tag in ("conflict_ratio", "cosine_mean")]
        cells.append(mean_std([r["step_s"] for r in runs]))
        rows.append(f"| {label} (n={len(runs)}) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plots(results: dict[str, dict], out: Path) -> None:
    """Conflict curves per arm (mean ± std over seeds), accuracy per arm and type, and the sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms = {arm: [r for r in results.values() if r["run"]["arm"] == arm] for arm in ("baseline", "stgc")}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, tag, title in zip(
        axes,
        ("conflict_ratio", "cosine_mean"),
        ("conflict ratio", "gradient consistency (mean cosine)"),
        strict=True,
    ):
        for arm, runs in arms.items():
            curves = [r["curves"][tag] for r in runs if r["curves"][tag]]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            steps = np.array([s for s, _ in curves[0][:length]])
            values = np.array([[v for _, v in c[:length]] for c in curves])
            mean, std = values.mean(0), values.std(0)
            axis.plot(steps, mean, label=f"{arm} (n={len(curves)})")
            axis.fill_between(steps, mean - std, mean + std, alpha=0.25)
        axis.set(title=title, xlabel="step")
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "conflicts_over_steps.png", dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4))
    keys = ["test/vqa_acc", *(f"test/vqa_acc_{q}" for q in QUESTION_TYPES)]
    for offset, (arm, runs) in zip((-0.2, 0.2), arms.items(), strict=True):
        values = np.array([[r["metrics"][k] for k in keys] for r in runs])
        axis.bar(
            np.arange(len(keys)) + offset,
            values.mean(0),
            width=0.4,
            yerr=values.std(0) if len(runs) > 1 else None,
            label=f"{arm} (n={len(runs)})",
            capsize=3,
        )
    axis.set_xticks(range(len(keys)), ["overall", *QUESTION_TYPES])
    axis.set(ylabel="test VQA accuracy", ylim=(0, 1))
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "accuracy.png", dpi=110)
    plt.close(figure)

    sweep = [r for r in results.values() if r["run"]["arm"] in ("sweep", "stgc") and r["run"]["seed"] == 0]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for threshold in sorted({r["run"]["threshold"] for r in sweep}):
        points = sorted(
            (r["run"]["loss_weight"], r["metrics"]["val/vqa_acc"], r["final"].get("conflict_ratio", np.nan))
            for r in sweep
            if r["run"]["threshold"] == threshold
        )
        axes[0].plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"τ = {threshold:g}")
        axes[1].plot([p[0] for p in points], [p[2] for p in points], "o-", label=f"τ = {threshold:g}")
    for axis, label in zip(axes, ("val VQA accuracy (seed 0)", "final conflict ratio (seed 0)"), strict=True):
        axis.set(xscale="log", xlabel="loss_weight λ", ylabel=label)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "sweep.png", dpi=110)
    plt.close(figure)


def ensure_stage2(args: argparse.Namespace, log_root: Path) -> None:
    """Train stages 0 to II once when the shared stage II checkpoint is missing."""
    if Path(args.stage2).is_file():
        return
    previous = None
    for stage in ("stage0", "stage1", "stage2"):
        fit_stage(stage, log_root, previous, args.extra)
        previous = stage
    args.stage2 = str(last_checkpoint(log_root, "stage2"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny slice and model: checks the script works")
    parser.add_argument("--stage2", default="logs/easy_vqa/stage2/checkpoints/last.ckpt")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--loss-weight", type=float, default=0.01)
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument("--sweep-loss-weights", type=float, nargs="*", default=[0.001, 0.01, 0.1, 1.0])
    parser.add_argument("--sweep-thresholds", type=float, nargs="*", default=[0.0])
    parser.add_argument("--out", default="results")
    parser.add_argument("--log-root", default="logs/study")
    args, args.extra = parser.parse_known_args()
    if args.quick:
        args.seeds, args.sweep_loss_weights = 2, [0.1]
        args.out, args.log_root, args.stage2 = f"{args.out}/quick", f"{args.log_root}/quick", "missing"
        args.extra += QUICK
    out, log_root = Path(args.out), Path(args.log_root)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    prepare(Path("data/easy_vqa"))  # the models need its tokenizer before any DataModule runs (idempotent)
    ensure_stage2(args, log_root)
    runs = plan(args)
    start = time.perf_counter()
    for index, run in enumerate(runs, 1):
        path = out / "runs" / f"{run.name}.json"
        if path.is_file():
            print(f"[{index}/{len(runs)}] {run.name}: done before, kept", flush=True)
            continue
        elapsed = time.perf_counter() - start
        print(f"[{index}/{len(runs)}] {run.name} (elapsed {elapsed / 60:.1f} min)", flush=True)
        path.write_text(json.dumps(train_stage3(run, args, log_root), indent=1) + "\n")
    results = {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}
    dense_path = out / "dense_stage2.json"
    if not dense_path.is_file():
        dense_path.write_text(json.dumps(dense_stage2(args, log_root), indent=1) + "\n")
    markdown = table(results, json.loads(dense_path.read_text()))
    (out / "results.md").write_text(markdown + "\n")
    plots(results, out)
    print(markdown)
    print(f"study finished in {(time.perf_counter() - start) / 60:.1f} min; outputs in {out}/")


if __name__ == "__main__":
    main()
