"""The pipeline behind `make train`: stages 0 -> I -> II (text, then images) -> III on easy-vqa.

Stage III runs twice from the same stage II: with STGC (stage3_stgc, the final model) and beside it the
baseline that only measures (stage3_baseline, STGC at λ = 0; --no-baseline skips it).

With `--pipeline mix` (`make train-mix`): the same stages on easy-vqa + Sort-of-CLEVR + its
text-only family (configs/mix/).

Each stage is one `stgc fit` (see stgc_experiments.pipeline); the stage II model and both stage III arms
are tested on the pipeline's test split. Prints each stage's wall time and validation metrics, the test
metrics with stage III's conflict ratio (over the last third of its steps), the peak resident memory,
and the TensorBoard command. Extra arguments go to every run
(e.g. --trainer.max_epochs=1).

A rerun keeps each stage that finished with the same settings (its `stgc fit` arguments and the
text of its config files, recorded in <log-root>/<pipeline>/<stage>/pipeline.json), resumes an
interrupted stage from its last.ckpt (written at every epoch end, so the resumption is exact; the
warm-up also writes it at each of its validations, four an epoch: resuming it mid-epoch is not checked
to be exact), and
trains every stage that starts from a retrained one again; it says which. --fresh starts every stage from scratch.
"""

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from stgc_experiments.pipeline import (
    DEFAULT,
    LATE_CONFLICT_RATIO,
    PIPELINES,
    STAGES,
    TESTED,
    fit_stage,
    last_checkpoint,
    late_conflict_ratio,
    metrics,
    run_folder,
    source,
    stage_record,
    stage_state,
    test_stage,
)


def run(
    stages: list[str], extra: list[str], log_root: str, fresh: bool = False, pipeline: str = DEFAULT
) -> dict:
    report, kept = {}, set()
    for stage in stages:
        previous = source(stage, pipeline=pipeline)  # the stage it starts from, when this run fits it too
        previous = previous if previous in report else None
        keep = not fresh and (previous is None or previous in kept)  # else it starts from a new model
        state = stage_state(stage, log_root, previous, extra, pipeline=pipeline) if keep else "new"
        if state == "finished":
            kept.add(stage)
            record = stage_record(log_root, stage, pipeline=pipeline)
            report[stage] = {"wall_s": record["wall_s"], **record["val"], "kept": True}
            print(f"[{stage}] kept: finished earlier with the same settings", flush=True)
        else:
            if state == "interrupted":
                checkpoint = last_checkpoint(log_root, stage, pipeline=pipeline)
                epoch = torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"]
                print(
                    f"[{stage}] resuming from {checkpoint} (end of epoch {epoch})",
                    flush=True,
                )
            start = time.perf_counter()
            cli = fit_stage(
                stage, log_root, previous, extra, resume=state == "interrupted", pipeline=pipeline
            )
            report[stage] = {"wall_s": round(time.perf_counter() - start, 1), **metrics(cli, "val/")}
            report[stage] |= {"resumed": True} if state == "interrupted" else {}
        print(f"[{stage}] {json.dumps(report[stage])}", flush=True)
    report["training_wall_s"] = round(sum(report[stage]["wall_s"] for stage in stages), 1)
    tested = [stage for stage in stages if stage in TESTED] or stages[-1:]
    report["test"] = {
        stage: metrics(test_stage(stage, log_root, extra, pipeline=pipeline), "test/")
        | late_conflict_ratio(run_folder(log_root, stage, pipeline=pipeline))
        for stage in tested
    }
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return report


def summary(tests: dict) -> str:
    """The tested models side by side: test accuracy and STGC's conflict ratio over the last third."""
    lines = [f"{'model':<16} {'test acc':>8}  conflict ratio (last third)"]
    for stage, test in tests.items():
        if "test/vqa_acc" not in test:  # stage 0 or I alone: no answers to score
            continue
        ratio = test.get(LATE_CONFLICT_RATIO)
        lines.append(f"{stage:<16} {test['test/vqa_acc']:>8.4f}  {'–' if ratio is None else f'{ratio:.4f}'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--pipeline", default=DEFAULT, choices=list(PIPELINES), help=f"default: {DEFAULT}")
    parser.add_argument(
        "--log-root", default="logs", help="relative: the repository root's (default: %(default)s)"
    )
    parser.add_argument("--report", default=None, help="also write the report as JSON here")
    parser.add_argument(
        "--fresh", action="store_true", help="train every stage from scratch, keeping nothing"
    )
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip stage3_baseline (STGC measuring at λ = 0 beside STGC)",
    )
    args, extra = parser.parse_known_args()
    stages = [stage for stage in args.stages if not (args.no_baseline and stage == "stage3_baseline")]
    report = run(stages, extra, args.log_root, args.fresh, args.pipeline)
    print(f"\n== {args.pipeline} pipeline ==")
    print(json.dumps(report, indent=2))
    print(f"\n{summary(report['test'])}")
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nWatch the runs: .venv/bin/tensorboard --logdir {args.log_root}/{args.pipeline}")


if __name__ == "__main__":
    main()
