"""The planted-conflict benchmark: STGC against a ground truth, planted by construction (docs/planted.md).

Ground-truth labels, the real STGC callback. Trains any cell's arms (baseline, STGC, random control, oracle) over seeds and
writes runs, summary.json, results.md and figures.

    python scripts/planted.py --planted-share 0.3 --experts 8 --top-k 2 --families 4 --seeds 3 --out DIR
    python scripts/planted.py --parts screen map control --readme     # results/planted (make planted)
"""

import argparse
import json
import logging
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import torch

from stgc.method.loss import LOSS_TYPES
from stgc_experiments.planted import summary as report
from stgc_experiments.planted.run import Arm, Schedule, run_seed
from stgc_experiments.planted.task import CONSTRUCTIONS, Cell

ROOT = Path(__file__).resolve().parents[1]
README_MARKERS = ("<!-- planted: written by scripts/planted.py -->", "<!-- planted: end -->")
SCREEN_SEED = 100  # the screen chooses on its own seed, never one of the comparison's
SCREEN_WEIGHTS = (0.1, 1.0)
MAP = {"planted_share": (0.05, 0.2, 0.5), "experts": (4, 8, 16), "top_k": (1, 2), "families": (2, 4, 8)}
QUICK = Schedule(train_tokens=1024, eval_tokens=512, batch_size=128, dense_steps=30, moe_steps=12)


def quiet() -> None:
    """One thread per process (jobs run side by side); no Trainer banners."""
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def run_unit(unit: tuple) -> list[str]:
    quiet()
    cell, seed, arms, schedule, out = unit
    paths = run_seed(cell, seed, arms, schedule, out)
    print(f"{cell.name} seed {seed}: {', '.join(arm.name for arm in arms)}", flush=True)
    return [str(path) for path in paths]


def run_units(units: list[tuple], jobs: int) -> None:
    if jobs == 1:
        for unit in units:
            run_unit(unit)
        return
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(run_unit, units))


def main_arms(loss_type: str, loss_weight: float) -> list[Arm]:
    return [Arm()] + [
        Arm(loss_type, loss_weight, selection) for selection in ("gradient", "random", "oracle")
    ]


def screen(center: Cell, schedule: Schedule, out: Path, jobs: int) -> dict:
    """Each loss form at two λ on the screen seed, at the center cell; the best val accuracy is chosen."""
    arms = [Arm()] + [Arm(form, weight) for form in LOSS_TYPES for weight in SCREEN_WEIGHTS]
    run_units([(center, SCREEN_SEED, [arm], schedule, out / "screen") for arm in arms], jobs)
    runs = {
        arm.name: json.loads(path.read_text())
        for arm, path in zip(
            arms,
            (out / "screen" / "runs" / center.name / arm.name / f"seed{SCREEN_SEED}.json" for arm in arms),
            strict=True,
        )
    }
    settings = {
        name: {"val_accuracy": run["val_accuracy"], "test_accuracy": run["accuracy"]}
        for name, run in runs.items()
    }
    best = max((arm for arm in arms if arm.loss_weight > 0), key=lambda arm: runs[arm.name]["val_accuracy"])
    chosen = {"loss_type": best.loss_type, "loss_weight": best.loss_weight, "name": best.name}
    result = {"cell": asdict(center), "seed": SCREEN_SEED, "chosen": chosen, "settings": settings}
    (out / "screen.json").write_text(json.dumps(result, indent=1))
    return result


def map_cells(center: Cell) -> list[Cell]:
    """The center and, one factor at a time, each other value of MAP."""
    cells = [center]
    for factor, values in MAP.items():
        cells += [replace(center, **{factor: value}) for value in values if value != getattr(center, factor)]
    return cells


def write_report(out: Path, chosen: str, center: Cell) -> dict:
    summary = report.summarize(out, chosen)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    runs = report.load_runs(out)
    lines = [
        "# Planted conflict: results",
        "",
        f"Written by `scripts/planted.py` from the runs beside it. Chosen on the screen: `{chosen}`; settings run: "
        f"{', '.join(f'`{s}`' for s in summary['settings'])}. Metric: test accuracy;",
        "intervals: seed-level paired 95% (Student's t over the per-seed differences). AUC, precision and recall: STGC's own",
        "cosine (exact/all) against the ground truth, over every step of the run. Construction and ground",
        "truth: [docs/planted.md](../../docs/planted.md).",
        "",
        *report.results_body(summary),
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    report.regime_map(summary, center.name, out / "regime_map.png")
    control = replace(center, construction="flip").name
    report.roc_figure(runs, [center.name, control], out / "roc.png")
    return summary


def readme_section(summary: dict, shown: list[str]) -> str:
    """The README's part: the tallies over the whole map, then the shown cells' table."""
    lines = [
        f"Chosen on the screen seed: `{summary['chosen']}`; seed-level paired 95% intervals; "
        "every cell: [results/planted/results.md](results/planted/results.md).",
        "",
        *report.tallies(summary),
        "",
        report.readme_table(summary, shown),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--planted-share", type=float, default=Cell.planted_share)
    parser.add_argument("--experts", type=int, default=Cell.experts)
    parser.add_argument("--top-k", type=int, default=Cell.top_k)
    parser.add_argument("--families", type=int, default=Cell.families)
    parser.add_argument("--construction", choices=CONSTRUCTIONS, default=Cell.construction)
    parser.add_argument(
        "--seeds", type=int, default=5, help="seeds 0..N-1 (each redraws the task, data and routers)"
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("cell", "screen", "map", "control"),
        default=["cell"],
        help="cell: the given cell; screen: choose the loss form and λ; map: the regime map around "
        "the given cell; control: the flip construction at the given cell",
    )
    parser.add_argument(
        "--loss-type", choices=LOSS_TYPES, help="default: the screen's choice (out/screen.json)"
    )
    parser.add_argument("--loss-weight", type=float, help="default: the screen's choice")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "planted")
    parser.add_argument("--jobs", type=int, default=2, help="processes side by side, one thread each")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny schedule: checks the benchmark runs end to end"
    )
    parser.add_argument("--report-only", action="store_true", help="write the summary from the runs in --out")
    parser.add_argument("--readme", action="store_true", help="also write the README's planted section")
    args = parser.parse_args()
    quiet()
    center = Cell(args.planted_share, args.experts, args.top_k, args.families, args.construction)
    schedule = QUICK if args.quick else Schedule()
    args.out.mkdir(parents=True, exist_ok=True)
    screened = args.out / "screen.json"
    if "screen" in args.parts and not args.report_only:
        screen(center, schedule, args.out, args.jobs)
    if args.loss_type is None or args.loss_weight is None:
        chosen = (
            json.loads(screened.read_text())["chosen"]
            if screened.exists()
            else {"loss_type": "unlikelihood", "loss_weight": 1.0}
        )
        args.loss_type = args.loss_type or chosen["loss_type"]
        args.loss_weight = args.loss_weight if args.loss_weight is not None else chosen["loss_weight"]
    arms = main_arms(args.loss_type, args.loss_weight)
    cells = []
    if "cell" in args.parts:
        cells.append(center)
    if "map" in args.parts:
        cells += [cell for cell in map_cells(center) if cell not in cells]
    if "control" in args.parts:
        cells.append(replace(center, construction="flip"))
    if not args.report_only:
        run_units(
            [(cell, seed, arms, schedule, args.out) for cell in cells for seed in range(args.seeds)],
            args.jobs,
        )
    chosen = json.loads(screened.read_text())["chosen"]["name"] if screened.exists() else arms[1].name
    summary = write_report(args.out, chosen, center)
    print((args.out / "results.md").read_text())
    if args.readme:
        shown = [center.name, replace(center, top_k=1).name, replace(center, construction="flip").name]
        report.write_readme_section(ROOT / "README.md", README_MARKERS, readme_section(summary, shown))


if __name__ == "__main__":
    main()
