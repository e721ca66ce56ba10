"""Is `make train`'s dense recipe robust: stage II test accuracy at several thread counts and data seeds.

Runs scripts/train_easy_vqa.py's stages 0 -> II once per (threads, seed) cell, each under its own log
root (logs/robustness/threads<T>_seed<S>; resumable: finished stages are kept), with OMP_NUM_THREADS=T
and the data's split, order and initialisation drawn from seed S (--data.init_args.seed,
--seed_everything). Prints, and writes to --out, a table of the warm-up's val accuracy and stage II's
test accuracy per question type, with whether it reaches --target.

    python scripts/robustness.py                                # 1, 2, 4 threads at seed 0; seeds 1, 2 at 2
    python scripts/robustness.py --cells 1:0 4:0 2:0:logs 2:1 2:2  # 2:0 from make train's own logs/
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DENSE = ["stage0", "stage1", "stage2_text", "stage2"]
CELLS = ["1:0", "2:0", "4:0", "2:1", "2:2"]  # threads:seed


def train(threads: int, seed: int, log_root: Path, extra: list[str]) -> dict:
    """The dense stages of one cell; its report (train_easy_vqa.py --report)."""
    report = log_root / "report.json"
    command = [
        sys.executable, str(ROOT / "scripts" / "train_easy_vqa.py"), "--stages", *DENSE,
        "--log-root", str(log_root), "--report", str(report), *extra,
    ]  # fmt: skip
    if seed != 0:  # seed 0 is the configs' own: its arguments are make train's, so its stages are kept
        command += [f"--data.init_args.seed={seed}", f"--seed_everything={seed}"]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    return json.loads(report.read_text())


def table(rows: list[tuple[int, int, dict]], target: float) -> str:
    lines = [
        "| threads | data seed | warm-up val | stage II test (overall / yes-no / color / shape) | ≥ target |",
        "| --- | --- | --- | --- | --- |",
    ]
    for threads, seed, report in rows:
        test = report["test"]["stage2"]
        cells = " / ".join(f"{test.get(k, float('nan')):.3f}" for k in (
            "test/vqa_acc", "test/vqa_acc_yes_no", "test/vqa_acc_color", "test/vqa_acc_shape"))  # fmt: skip
        reached = "yes" if test["test/vqa_acc"] >= target else "**no**"
        warmup = report["stage2_text"].get("val/vqa_acc", float("nan"))
        lines.append(f"| {threads} | {seed} | {warmup:.3f} | {cells} | {reached} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cells", nargs="+", default=CELLS, help="threads:seed[:log root], default: %(default)s"
    )
    parser.add_argument("--target", type=float, default=0.94, help="stage II test accuracy to reach")
    parser.add_argument("--out", default="results/robustness.md")
    args, extra = parser.parse_known_args()
    rows = []
    for cell in args.cells:
        threads, seed, *root = cell.split(":", 2)
        threads, seed = int(threads), int(seed)
        log_root = Path(root[0] if root else f"logs/robustness/threads{threads}_seed{seed}")
        rows.append((threads, seed, train(threads, seed, log_root, extra)))
        Path(args.out).write_text(table(rows, args.target))  # after every cell: a partial table survives
    print(table(rows, args.target))


if __name__ == "__main__":
    main()
