"""The default pipeline behind `make train`: stages I -> II -> III on the bundled easy-vqa data.

Each stage is one `stgc fit` with the stage's config and starts from the previous stage's last
checkpoint; the final model is tested once on the easy-vqa test split. Prints each stage's wall
time and validation metrics, the test metrics, the peak resident memory, and the TensorBoard
command. Extra arguments go to every `stgc fit` (e.g. --trainer.max_epochs=1).
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from stgc.cli import main as stgc

CONFIGS = Path("configs")
STAGES = {
    "stage1": CONFIGS / "easy_vqa" / "stage1_pretrain.yaml",
    "stage2": CONFIGS / "easy_vqa" / "stage2_finetune.yaml",
    "stage3": CONFIGS / "easy_vqa" / "stage3_moe.yaml",
}


def _metrics(trainer, prefix: str) -> dict[str, float]:
    return {
        k: round(float(v), 4) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith(prefix)
    }


def _last_checkpoint(log_root: str, stage: str) -> Path:
    return Path(log_root) / "easy_vqa" / stage / "checkpoints" / "last.ckpt"


def run(stages: list[str], extra: list[str], log_root: str) -> dict:
    report = {}
    base = ["-c", str(CONFIGS / "trainer.yaml"), "-c", str(CONFIGS / "easy_vqa" / "model.yaml")]
    previous = None
    for stage in stages:
        start = time.perf_counter()
        init_from = [f"--model.init_from={_last_checkpoint(log_root, previous)}"] if previous else []
        cli = stgc(
            [
                "fit",
                *base,
                "-c",
                str(STAGES[stage]),
                f"--trainer.logger.init_args.save_dir={log_root}",
                *init_from,
                *extra,
            ]
        )
        report[stage] = {"wall_s": round(time.perf_counter() - start, 1), **_metrics(cli.trainer, "val/")}
        print(f"[{stage}] {json.dumps(report[stage])}", flush=True)
        previous = stage
    cli = stgc(
        [
            "test",
            *base,
            "-c",
            str(STAGES[previous]),
            f"--trainer.logger.init_args.save_dir={log_root}",
            f"--ckpt_path={_last_checkpoint(log_root, previous)}",
            *extra,
        ]
    )
    report["test"] = _metrics(cli.trainer, "test/")
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--log-root", default="logs")
    parser.add_argument("--report", default=None, help="also write the report as JSON here")
    args, extra = parser.parse_known_args()
    report = run(args.stages, extra, args.log_root)
    print("\n== easy-vqa pipeline ==")
    print(json.dumps(report, indent=2))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nWatch the runs: tensorboard --logdir {args.log_root}/easy_vqa", file=sys.stderr)


if __name__ == "__main__":
    main()
