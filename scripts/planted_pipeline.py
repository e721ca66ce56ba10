"""The planted-conflict benchmark on the real pipeline: easy-vqa's stage III through `stgc fit`.

A planted instruction family ("opposite: <yes/no question>", answered flipped) against its ground truth
(docs/planted.md). Arms: baseline (λ = 0), STGC, its random control and the oracle, over seeds.

    python scripts/planted_pipeline.py --parts screen main --readme   # results/planted/pipeline (make planted-pipeline)
    python scripts/planted_pipeline.py --planted-share 0.3 --seeds 3 --out DIR
"""

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from stgc.method.loss import LOSS_TYPES
from stgc_experiments import ROOT
from stgc_experiments.planted import summary as report
from stgc_experiments.planted.questions import PLANTED, Questions, run_arm
from stgc_experiments.planted.run import Arm

SCREEN_SEED = 100  # the screen chooses on its own seed, never one of the comparison's
SCREEN_WEIGHTS = (0.1, 1.0)
QUICK = [
    "--trainer.limit_train_batches=3",
    "--data.init_args.val_fraction=0.25",
    "--data.init_args.batch_size=8",
]
README_MARKERS = (
    "<!-- planted pipeline: written by scripts/planted_pipeline.py -->",
    "<!-- planted pipeline: end -->",
)


def screen(cell: Questions, out: Path, log_root: Path, extra: list[str]) -> dict:
    """Each loss form at two λ on the screen seed; the best val accuracy is chosen."""
    arms = [Arm()] + [Arm(form, weight) for form in LOSS_TYPES for weight in SCREEN_WEIGHTS]
    runs = {
        arm.name: json.loads(
            run_arm(arm, SCREEN_SEED, cell, out / "screen", log_root / "screen", extra).read_text()
        )
        for arm in arms
    }
    best = max((arm for arm in arms if arm.loss_weight > 0), key=lambda arm: runs[arm.name]["val_accuracy"])
    result = {
        "cell": asdict(cell),
        "seed": SCREEN_SEED,
        "chosen": {"loss_type": best.loss_type, "loss_weight": best.loss_weight, "name": best.name},
        "settings": {
            name: {"val_accuracy": run["val_accuracy"], "test_accuracy": run["accuracy"],
                   "test_accuracy_planted": run["accuracy_planted"]}
            for name, run in runs.items()
        },
    }  # fmt: skip
    (out / "screen.json").write_text(json.dumps(result, indent=1))
    return result


def write_report(out: Path, chosen: str, cell: Questions) -> dict:
    summary = report.summarize(out, chosen)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "# Planted conflict, pipeline level: results",
        "",
        f"Written by `scripts/planted_pipeline.py` from the runs beside it: easy-vqa's stage III through `stgc fit`, "
        f"the planted family {cell.planted_share:g} of the yes/no records. Chosen on the screen: `{chosen}`. Metric: "
        "test accuracy; intervals: seed-level paired 95% (Student's t over the per-seed differences). AUC, precision "
        "and recall: STGC's own cosine (exact/all) against the ground truth (the yes/no records' decision "
        "positions), over every step. Construction: [docs/planted.md](../../../docs/planted.md#the-pipeline-level).",
        "",
        *report.results_body(summary),
        "",
        *arm_table(out, cell),
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    report.roc_figure(report.load_runs(out), [cell.name], out / "roc.png")
    return summary


def arm_table(out: Path, cell: Questions) -> list[str]:
    """Per arm, means over its seeds: accuracy per question type; how differently the experts serve the
    planted and the base yes/no questions (planted_split); flag persistence; the planted pairs' share of
    the labelled pairs and of their gradient mass Σ‖g_t‖² (where measured)."""
    types = ("yes_no", "color", "shape", PLANTED)
    lines = [
        "Per arm (means over seeds): test accuracy per question type, routing, and whose gradients dominate:",
        "",
        "| arm | seeds | "
        + " | ".join(types)
        + " | planted split | flag persistence | planted share of pairs "
        "| planted share of Σ‖g‖² |",
        "|" + " --- |" * (len(types) + 6),
    ]
    for name, runs in report.load_runs(out).get(cell.name, {}).items():
        mean = lambda get, runs=runs: report.mean_of(runs, get)  # noqa: E731
        cells = [report.fmt(mean(lambda r, t=t: r["family_accuracy"].get(t))) for t in types]
        cells += [report.fmt(mean(lambda r, k=k: r.get(k))) for k in ("planted_split", "flag_persistence")]
        cells.append(report.fmt(mean(lambda r: r["detection"][report.OWN_VARIANT]["planted_rate"])))
        cells.append(report.fmt(mean(lambda r: r.get("grad_mass_planted"))))
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--planted-share", type=float, default=Questions.planted_share)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (each redraws the records, the "
                        "planted ones, the data order and the routers)")  # fmt: skip
    parser.add_argument("--parts", nargs="+", choices=("screen", "main"), default=["main"])
    parser.add_argument(
        "--loss-type", choices=LOSS_TYPES, help="default: the screen's choice (out/screen.json)"
    )
    parser.add_argument("--loss-weight", type=float, help="default: the screen's choice")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "planted" / "pipeline")
    parser.add_argument("--log-root", type=Path, default=ROOT / "logs" / "planted_pipeline")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny slice: checks the pipeline runs end to end"
    )
    parser.add_argument("--report-only", action="store_true", help="write the summary from the runs in --out")
    parser.add_argument("--readme", action="store_true", help="also write the README's pipeline-level table")
    args = parser.parse_args()
    cell = Questions(args.planted_share, *((200, 100) if args.quick else ()))
    extra = QUICK if args.quick else []
    args.out.mkdir(parents=True, exist_ok=True)
    screened = args.out / "screen.json"
    if "screen" in args.parts and not args.report_only:
        screen(cell, args.out, args.log_root, extra)
    chosen = json.loads(screened.read_text())["chosen"] if screened.exists() else {}
    loss_type = args.loss_type or chosen.get("loss_type", "unlikelihood")
    loss_weight = args.loss_weight if args.loss_weight is not None else chosen.get("loss_weight", 1.0)
    arms = [Arm()] + [
        Arm(loss_type, loss_weight, selection) for selection in ("gradient", "random", "oracle")
    ]
    if "main" in args.parts and not args.report_only:
        for seed in range(args.seeds):  # seed by seed: an unfinished run still has paired arms
            for arm in arms:
                run_arm(arm, seed, cell, args.out, args.log_root, extra)
    summary = write_report(args.out, chosen.get("name", arms[1].name), cell)
    print((args.out / "results.md").read_text())
    if args.readme:
        report.write_readme_section(
            ROOT / "README.md", README_MARKERS, report.readme_table(summary, [cell.name])
        )


if __name__ == "__main__":
    main()
