"""Does STGC reduce token gradient conflicts and help accuracy? Baseline MoE vs MoE + STGC on easy-vqa.

From one shared stage II checkpoint, every run trains stage III under the same budget (one epoch):
  1. baseline: the MoE with STGC in measuring mode (loss_weight 0), so both arms log the same
     statistics, over --seeds seeds;
  2. plain: the MoE without the callback, 40 steps: the step time STGC's overhead is measured against;
  3. sweep: STGC at each loss_weight (first threshold), then at each other threshold with the best
     loss_weight, seed 0;
  4. stgc: the sweep setting with the best validation accuracy, over the remaining seeds.
Choices are made on the validation split carved from train. The runs in the table are tested once,
at their end, on a fixed third of the test split (every 3rd image: 334 images, 3,227 questions).

    python scripts/reproduce.py            # the study (~60 min on 2 CPU cores)
    python scripts/reproduce.py --quick    # a tiny slice, to keep the script working (~3 min)

Finished runs are kept (results/runs/<run>.json) and skipped when the study is run again. Writes
results/*.png plots and results/results.md, which the README's "Results" section links to.
"""

import argparse
import json
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stgc.cli import run as stgc
from stgc.easy_vqa.pipeline import chain, fit_stage, last_checkpoint, source, stage_args, stage_config
from stgc.easy_vqa.prepare import QUESTION_TYPES, prepare
from stgc.model.metrics import metric_name

TYPE_KEYS = [f"test/vqa_acc_{metric_name(q)}" for q in QUESTION_TYPES]  # logged test accuracy per type
QUICK = [  # a tiny slice, model and budget: checks that the study runs end to end
    "--data.init_args.limit_records=48",
    "--data.init_args.val_fraction=0.25",
    "--data.init_args.batch_size=8",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_test_batches=2",
    "--trainer.log_every_n_steps=1",
]


# The plain run (no callback) only times training steps: it would otherwise train exactly as the
# baseline's seed 0 does, since loss_weight 0 leaves every gradient unchanged.
PLAIN_BUDGET = ["--trainer.max_steps=40", "--trainer.limit_val_batches=0"]


@dataclass(frozen=True)
class Run:
    seed: int
    loss_weight: float = 0.0  # 0: the baseline, STGC only measures
    threshold: float = 0.0
    callback: bool = True  # False: the MoE without STGC at all, to time a plain step

    @property
    def arm(self) -> str:
        if not self.callback:
            return "plain"
        return "baseline" if self.loss_weight == 0 else "stgc"

    @property
    def name(self) -> str:
        if self.arm == "stgc":
            return f"stgc_lw{self.loss_weight:g}_tau{self.threshold:g}_seed{self.seed}"
        return f"{self.arm}_seed{self.seed}"


def choose(results: dict[str, dict], grid: list[Run]) -> Run:
    """The sweep setting with the best val accuracy; ties go to the lower val loss (conflict ratios
    are not comparable across thresholds)."""

    def key(run: Run) -> tuple[float, float]:
        metrics = results[run.name]["metrics"]
        return -metrics["val/vqa_acc"], metrics["val/loss"]

    return min(grid, key=key)


def scalars(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    if tag not in events.Tags()["scalars"]:
        return []
    return [(event.step, event.value) for event in events.Scalars(tag)]


def train_step_s(events: EventAccumulator) -> float:
    """Median seconds per training step between consecutive train/loss logs (validation excluded)."""
    logged = events.Scalars("train/loss")
    gaps = [
        (b.wall_time - a.wall_time) / (b.step - a.step)
        for a, b in zip(logged[:-1], logged[1:], strict=True)
        if b.step > a.step
    ]
    return statistics.median(gaps) if gaps else float("nan")


def test_subset(args: argparse.Namespace, log_root: Path) -> Path:
    """Every --test-every-th record (image) of the easy-vqa test file: the fixed test set of the study."""
    path = log_root / f"instruct_test_every{args.test_every}.json"
    if not path.is_file():
        records = json.loads(Path("data/easy_vqa/instruct_test.json").read_text())
        path.write_text(json.dumps(records[:: args.test_every]))
    return path


def stage3_args(run: Run, args: argparse.Namespace, log_root: Path) -> list[str]:
    budget = PLAIN_BUDGET if run.arm == "plain" else []
    return [
        *stage_args("stage3", log_root),
        f"--trainer.logger.init_args.version={run.name}",
        f"--seed_everything={run.seed}",
        f"--model.init_args.init_from={args.stage2}",
        f"--data.init_args.test_json={test_subset(args, log_root)}",
        *args.extra,
        *budget,
    ]


def train_stage3(run: Run, args: argparse.Namespace, log_root: Path) -> dict:
    """One stage III fit with STGC at the run's settings: val metrics, conflict curves, step time."""
    callback = [
        "--trainer.callbacks+=stgc.STGC",
        f"--trainer.callbacks.loss_weight={run.loss_weight}",
        f"--trainer.callbacks.threshold={run.threshold}",
        "--trainer.callbacks.histogram_every_n_steps=0",
    ]
    start = time.perf_counter()
    fit = stgc(["fit", *stage3_args(run, args, log_root), *(callback if run.callback else [])])
    wall = time.perf_counter() - start
    events = EventAccumulator(str(log_root / "easy_vqa" / run.name), size_guidance={"scalars": 0}).Reload()
    curves = {
        tag: scalars(events, f"stgc/{tag}/all") for tag in ("conflict_ratio", "cosine_mean", "cosine_std")
    }
    return {
        "run": {**run.__dict__, "arm": run.arm},
        "steps": fit.trainer.global_step,
        "wall_s": wall,
        "step_s": train_step_s(events),
        "metrics": {k: float(v) for k, v in fit.trainer.callback_metrics.items() if k.startswith("val/")},
        "curves": curves,
        "final": {tag: statistics.fmean(v for _, v in curve[-3:]) for tag, curve in curves.items() if curve},
    }


def test_stage3(run: Run, args: argparse.Namespace, log_root: Path) -> dict[str, float]:
    """The test metrics of a run's last checkpoint (only runs reported in the table are tested)."""
    checkpoint = log_root / "easy_vqa" / run.name / "checkpoints" / "last.ckpt"
    test = stgc(["test", *stage3_args(run, args, log_root), f"--ckpt_path={checkpoint}"])
    return {k: float(v) for k, v in test.trainer.callback_metrics.items() if k.startswith("test/")}


def dense_stage2(args: argparse.Namespace, log_root: Path) -> dict:
    """The shared stage II model, validated and tested once (the dense row of the table)."""
    stage2 = [
        *stage_args(source("stage3"), log_root),
        "--model.init_args.init_from=null",
        f"--ckpt_path={args.stage2}",
        "--trainer.logger.init_args.version=dense_stage2",
        f"--data.init_args.test_json={test_subset(args, log_root)}",
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


def table(arms: dict[str, list[dict]], plain: dict, dense: dict) -> str:
    """The Markdown results table: accuracy, conflict ratio, gradient consistency, step time."""
    rows = [
        "| model | test acc | val acc | "
        + "".join(f"test {q} | " for q in QUESTION_TYPES)
        + "conflict ratio at τ | gradient consistency (cos mean) | train step (ms) | step time vs plain MoE |",
        "|" + " --- |" * (7 + len(QUESTION_TYPES)),
    ]
    dense_metrics = dense["metrics"]
    rows.append(
        f"| dense (stage II) | {dense_metrics['test/vqa_acc']:.3f} | {dense_metrics['val/vqa_acc']:.3f} | "
        + " | ".join(f"{dense_metrics.get(key, float('nan')):.3f}" for key in TYPE_KEYS)
        + " | – | – | – | – |"
    )
    rows.append(
        "| MoE, no callback (n=1, steps timed only) | – | – | " + "– | " * len(QUESTION_TYPES) + "– | – | "
        f"{1e3 * plain['step_s']:.0f} | 1.00 |"
    )
    for label, runs in arms.items():
        cells = [
            mean_std([r["metrics"][key] for r in runs]) for key in ("test/vqa_acc", "val/vqa_acc", *TYPE_KEYS)
        ]
        cells += [mean_std([r["final"][tag] for r in runs]) for tag in ("conflict_ratio", "cosine_mean")]
        step_s = statistics.fmean(r["step_s"] for r in runs)
        cells += [f"{1e3 * step_s:.0f}", f"{step_s / plain['step_s']:.2f}"]
        rows.append(f"| {label} (n={len(runs)}) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plots(arms: dict[str, list[dict]], sweep: list[dict], out: Path) -> None:
    """Conflict curves per arm (mean ± std over seeds), accuracy per arm and type, and the sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, tag, title in zip(
        axes,
        ("conflict_ratio", "cosine_mean"),
        ("conflict ratio", "gradient consistency (mean cosine)"),
        strict=True,
    ):
        for label, runs in arms.items():
            curves = [r["curves"][tag] for r in runs if r["curves"].get(tag)]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            steps = np.array([s for s, _ in curves[0][:length]])
            values = np.array([[v for _, v in c[:length]] for c in curves])
            mean, std = values.mean(0), values.std(0)
            axis.plot(steps, mean, label=f"{label} (n={len(curves)})")
            axis.fill_between(steps, mean - std, mean + std, alpha=0.25)
        axis.set(title=title, xlabel="step")
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "conflicts_over_steps.png", dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(8, 4))
    keys = ["test/vqa_acc", *TYPE_KEYS]
    width = 0.8 / len(arms)
    for index, (label, runs) in enumerate(arms.items()):
        values = np.array([[r["metrics"][k] for k in keys] for r in runs])
        axis.bar(
            np.arange(len(keys)) + (index - (len(arms) - 1) / 2) * width,
            values.mean(0),
            width=width,
            yerr=values.std(0) if len(runs) > 1 else None,
            label=f"{label} (n={len(runs)})",
            capsize=3,
        )
    axis.set_xticks(range(len(keys)), ["overall", *QUESTION_TYPES])
    axis.set(ylabel="test VQA accuracy", ylim=(0, 1))
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out / "accuracy.png", dpi=110)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    baseline = next((r for runs in arms.values() for r in runs if r["run"]["arm"] == "baseline"), None)
    for threshold in sorted({r["run"]["threshold"] for r in sweep}):
        points = sorted(
            (r["run"]["loss_weight"], r["metrics"]["val/vqa_acc"], r["final"].get("conflict_ratio", np.nan))
            for r in sweep
            if r["run"]["threshold"] == threshold
        )
        for axis, column in zip(axes, (1, 2), strict=True):
            axis.plot([p[0] for p in points], [p[column] for p in points], "o-", label=f"τ = {threshold:g}")
    if baseline is not None:
        for axis, value in zip(
            axes, (baseline["metrics"]["val/vqa_acc"], baseline["final"]["conflict_ratio"]), strict=True
        ):
            axis.axhline(value, color="gray", linestyle="--", label="baseline (λ = 0)")
    for axis, label in zip(axes, ("val VQA accuracy (seed 0)", "final conflict ratio (seed 0)"), strict=True):
        axis.set(xscale="log", xlabel="loss_weight λ", ylabel=label)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "sweep.png", dpi=110)
    plt.close(figure)


def ensure_stage2(args: argparse.Namespace, log_root: Path) -> None:
    """Train the stages up to the one stage III starts from (stage II) once, when its checkpoint is missing."""
    if Path(args.stage2).is_file():
        return
    previous = None
    for stage in chain(source("stage3")):
        fit_stage(stage, log_root, previous, args.extra)
        previous = stage
    args.stage2 = str(last_checkpoint(log_root, previous))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny slice and model: checks the script works")
    parser.add_argument(
        "--stage2",
        default=stage_config("stage3").model.init_args.init_from,
        help="the checkpoint every stage III run starts from (default: the one stage3_moe.yaml names)",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sweep-loss-weights", type=float, nargs="*", default=[0.01, 0.1, 1.0])
    parser.add_argument("--sweep-thresholds", type=float, nargs="+", default=[0.0, -0.1])
    parser.add_argument("--test-every", type=int, default=3, help="test on every n-th test question")
    parser.add_argument("--out", default="results")
    parser.add_argument("--log-root", default="logs/study")
    args, args.extra = parser.parse_known_args()
    if args.quick:
        args.seeds, args.sweep_loss_weights, args.sweep_thresholds = 2, [0.1, 1.0], [0.0]
        args.out, args.log_root, args.stage2 = f"{args.out}/quick", f"{args.log_root}/quick", "missing"
        args.extra += QUICK
    out, log_root = Path(args.out), Path(args.log_root)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    prepare(Path("data/easy_vqa"))  # the models need its tokenizer before any DataModule runs (idempotent)
    ensure_stage2(args, log_root)
    results = {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}
    start = time.perf_counter()
    baseline = [Run(seed) for seed in range(args.seeds)]
    plain = [Run(0, callback=False)]
    first, *other_thresholds = args.sweep_thresholds
    total = len(baseline) + len(plain) + len(args.sweep_loss_weights) + len(other_thresholds) + args.seeds - 1
    done = 0

    def execute(runs: list[Run], test: bool) -> list[dict]:
        nonlocal done
        for run in runs:
            done += 1
            path = out / "runs" / f"{run.name}.json"
            if run.name in results:
                print(f"[{done}/{total}] {run.name}: trained before, kept", flush=True)
            else:
                elapsed = (time.perf_counter() - start) / 60
                print(f"[{done}/{total}] {run.name} (elapsed {elapsed:.1f} min)", flush=True)
                results[run.name] = train_stage3(run, args, log_root)
                path.write_text(json.dumps(results[run.name], indent=1) + "\n")
            if test and "test/vqa_acc" not in results[run.name]["metrics"]:
                results[run.name]["metrics"] |= test_stage3(run, args, log_root)
                path.write_text(json.dumps(results[run.name], indent=1) + "\n")
        return [results[run.name] for run in runs]

    # the baseline measures conflicts at the first threshold: its conflict ratio compares with
    # STGC's only at that threshold (cosine mean and std compare at any)
    arms = {f"MoE baseline (λ=0, τ={first:g})": execute(baseline, test=True)}
    execute(plain, test=False)
    # the sweep (seed 0, chosen on val; only the chosen setting is tested): loss_weight at the first
    # threshold, then the other thresholds at the best loss_weight
    grid = [Run(0, loss_weight, first) for loss_weight in args.sweep_loss_weights]
    execute(grid, test=False)
    best = choose(results, grid)
    grid += [Run(0, best.loss_weight, threshold) for threshold in other_thresholds]
    execute(grid[len(args.sweep_loss_weights) :], test=False)
    chosen = choose(results, grid)
    print(f"chosen on val: loss_weight={chosen.loss_weight:g}, threshold={chosen.threshold:g}", flush=True)
    done -= 1  # the chosen setting's seed 0 is a sweep run, counted already
    arms[f"MoE + STGC (λ={chosen.loss_weight:g}, τ={chosen.threshold:g})"] = execute(
        [replace(chosen, seed=seed) for seed in range(args.seeds)], test=True
    )
    dense_path = out / "dense_stage2.json"
    if not dense_path.is_file():
        dense_path.write_text(json.dumps(dense_stage2(args, log_root), indent=1) + "\n")
    markdown = table(arms, results[plain[0].name], json.loads(dense_path.read_text()))
    (out / "results.md").write_text(markdown + "\n")
    plots(arms, [results[run.name] for run in grid], out)
    print(markdown)
    print(f"study finished in {(time.perf_counter() - start) / 60:.1f} min; outputs in {out}/")


if __name__ == "__main__":
    main()
