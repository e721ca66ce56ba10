"""Does the CEL move routing? Short stage III runs from one stage II checkpoint, and their diagnostics.

The arms: the MoE baseline (λ = 0, STGC measuring) and STGC with each loss form at one λ.

    python scripts/stgc_mechanism.py --stage2 logs/easy_vqa/stage2/checkpoints/last.ckpt --steps 120

Per arm it prints, averaged over the logging steps and the MoE layers: the reroute rate of flagged
pairs, the mean change of p_{t,e} over flagged and other pairs, the CEL's share of the router
gradient; the experts' drift at the end; the exact-vs-output cosine Pearson correlation (histogram
steps); conflict ratio, cosine mean and its null level. Writes <out>/mechanism.json.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stgc.method import Settings, names
from stgc.method.loss import LOSS_TYPES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["configs/trainer.yaml", "configs/easy_vqa/model.yaml", "configs/easy_vqa/stage3_moe.yaml"]
STGC_CONFIG = "configs/easy_vqa/stage3_moe_stgc.yaml"
PER_LAYER = (  # averaged over logging steps and layers
    names.REROUTE_RATE,
    names.DELTA_P_FLAGGED,
    names.DELTA_P_OTHER,
    names.CEL_GRAD_RATIO,
    names.EXACT_OUTPUT_PEARSON,
    names.CONFLICT_RATIO,
    names.COSINE_MEAN,
    names.COSINE_NULL,
)


def fit(arm: str, loss_weight: float, loss_type: str, args: argparse.Namespace) -> float:
    """Train one arm (skipped when its events exist); returns its wall time in seconds (0 when skipped)."""
    if list((args.out / "easy_vqa" / arm).glob("events.out.tfevents.*")):
        return 0.0
    configs = [flag for config in [*CONFIGS, STGC_CONFIG] for flag in ("-c", config)]
    command = [
        sys.executable, "-m", "stgc", "fit", *configs,
        f"--model.init_args.init_from={args.stage2}", f"--seed_everything={args.seed}",
        f"--trainer.max_steps={args.steps}", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=10",
        f"--trainer.logger.init_args.save_dir={args.out}", f"--trainer.logger.init_args.version={arm}",
        f"--trainer.callbacks.loss_weight={loss_weight}", f"--trainer.callbacks.loss_type={loss_type}",
        f"--trainer.callbacks.threshold={args.threshold}", "--trainer.callbacks.histogram_every_n_steps=20",
        *args.extra,
    ]  # fmt: skip
    start = time.monotonic()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.monotonic() - start


def summary(events_dir: Path) -> dict[str, float]:
    """Each PER_LAYER quantity averaged over its steps and layers; expert drift at the last step."""
    events = EventAccumulator(str(events_dir), size_guidance={"scalars": 0}).Reload()
    tags = events.Tags()["scalars"]
    result = {}
    for name in PER_LAYER:
        values = [
            s.value for tag in tags if names.layer_of(tag, name) is not None for s in events.Scalars(tag)
        ]  # fmt: skip
        if values:
            result[name] = statistics.fmean(values)
    drift = [events.Scalars(tag)[-1].value for tag in tags if names.layer_of(tag, names.EXPERT_DRIFT)]
    if drift:
        result["expert_drift_end"] = statistics.fmean(drift)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage2", required=True, help="the stage II checkpoint every arm starts from")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--loss-weight", type=float, default=Settings.loss_weight)
    parser.add_argument("--threshold", type=float, default=Settings.threshold)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "mechanism")
    parser.add_argument("extra", nargs="*", help="more `stgc fit` arguments, after --")
    args = parser.parse_args()
    arms = {"baseline": (0.0, LOSS_TYPES[0])} | {form: (args.loss_weight, form) for form in LOSS_TYPES}
    results = {}
    for arm, (loss_weight, loss_type) in arms.items():
        seconds = fit(arm, loss_weight, loss_type, args)
        results[arm] = {"loss_weight": loss_weight, "seconds": round(seconds, 1)}
        results[arm] |= summary(args.out / "easy_vqa" / arm)
    (args.out / "mechanism.json").write_text(json.dumps(results, indent=2))
    columns = ["loss_weight", *PER_LAYER, "expert_drift_end"]
    print(f"{'arm':27s} " + " ".join(f"{c[:12]:>12s}" for c in columns))
    for arm, row in results.items():
        print(f"{arm:27s} " + " ".join(f"{row.get(c, float('nan')):12.4f}" for c in columns))


if __name__ == "__main__":
    main()
