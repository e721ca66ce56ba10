"""The default pipeline behind `make train`: stages 0 -> I -> II (text, then images) -> III on easy-vqa.

Each stage is one `stgc fit` (see stgc.pipeline); the stage II model and the final one are tested
on the easy-vqa test split. Prints each stage's wall time and validation metrics, the test metrics,
the peak resident memory, and the TensorBoard command. Extra arguments go to every run
(e.g. --trainer.max_epochs=1).
"""

import argparse
import json
import resource
import time
from pathlib import Path

from stgc.pipeline import STAGES, fit_stage, metrics, test_stage


def run(stages: list[str], extra: list[str], log_root: str) -> dict:
    report, previous = {}, None
    for stage in stages:
        start = time.perf_counter()
        cli = fit_stage(stage, log_root, previous, extra)
        report[stage] = {"wall_s": round(time.perf_counter() - start, 1), **metrics(cli, "val/")}
        print(f"[{stage}] {json.dumps(report[stage])}", flush=True)
        previous = stage
    report["training_wall_s"] = round(sum(report[stage]["wall_s"] for stage in stages), 1)
    tested = dict.fromkeys(s for s in ("stage2", previous) if s in stages)  # the dense model, the final one
    report["test"] = {stage: metrics(test_stage(stage, log_root, extra), "test/") for stage in tested}
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
    print(f"\nWatch the runs: .venv/bin/tensorboard --logdir {args.log_root}/easy_vqa")


if __name__ == "__main__":
    main()
