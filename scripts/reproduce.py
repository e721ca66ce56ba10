"""Does STGC help, and is it the gradients that matter? The study: stage III arms from one stage II model.

Per pipeline (easy_vqa; mix: easy-vqa + Sort-of-CLEVR + text-only), every arm trains stage III from
the same stage II checkpoint for --epochs epochs, then answers the test questions (`stgc predict`):
  1. dense: the stage II model itself, answering;
  2. baseline: the MoE with STGC measuring only (λ = 0, at the arms' τ), over --seeds seeds;
  3. screen (seed 0): every loss form at every --loss-weights λ; the best on val accuracy is chosen;
  4. main: the chosen setting and the random control (the same loss and λ on as many random
     assignments as the gradient flags: STGC(selection="random")) over --seeds seeds;
  5. variants (seed 0): the chosen setting with gradient="output", and with mean="others".
Per arm: test accuracy overall and per question family; its paired difference to the baseline
(same seeds, same questions) with a seed-level 95% interval (stgc.study.paired_interval: Student's t
over the per-seed differences; a bootstrap over questions for one seed); curves
of conflict ratio, cosine against its null level, reroute rate and expert drift; how differently
the experts serve image and text tokens, and the question families, at the end.

    python scripts/reproduce.py --pipeline easy_vqa     # hours on 2 CPU cores: see the README
    python scripts/reproduce.py --pipeline mix --parts dense main --loss-types unlikelihood --loss-weights 0.1
                                # the mix: easy-vqa's chosen setting, no screen (seeds: --seeds 0 1 2)
    python scripts/reproduce.py --quick                 # a tiny slice, to keep the script working

Resumable run by run: a finished run's results/<pipeline>/runs/<run>.json is kept and not run again.
The stage II model every arm starts from is kept as results/<pipeline>/stage2.ckpt (trained when
missing: retraining is bit-identical on one machine only); its weights' digest is recorded in every
run and checked. Writes results/<pipeline>/{results.md,summary.md,curves.png}; --readme puts every
pipeline's summary.md into the README's Results section. Two processes can share a study once its
stage2.ckpt is kept: `--parts dense main --seeds 0` beside `--parts main --seeds 1`, one thread each,
or within one seed `--arms baseline chosen` beside `--arms control`.
"""

import argparse
import hashlib
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import Subset

from stgc.cli import run as stgc
from stgc.method.loss import LOSS_TYPES
from stgc.easy_vqa.pipeline import PIPELINES, chain, fit_stage, last_checkpoint, source, stage_args
from stgc.easy_vqa.prepare import prepare
from stgc.study import (
    accuracies,
    answers_correct,
    expert_load_by_family,
    late_mean,
    layer_curves,
    paired_interval,
)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS_MARKERS = ("<!-- results: written by scripts/reproduce.py -->", "<!-- results: end -->")
LOAD_RECORDS = (
    2048  # test conversations, drawn at random (seed 0), whose routing gives the expert load per family
)
# how a run's expert loads were sampled: an evenly strided sample, as before, aliased with Sort-of-CLEVR's
# 12 questions per image (it met one subtype only); --refresh-loads redoes older runs from their checkpoints
LOAD_SAMPLE = f"random{LOAD_RECORDS}"
CURVES = ("conflict_ratio", "cosine_mean", "cosine_null", "reroute_rate", "expert_drift")
QUICK = [  # a tiny slice and budget: checks that the study runs end to end
    "--data.init_args.limit_records=48",
    "--data.init_args.val_fraction=0.25",
    "--data.init_args.batch_size=8",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_predict_batches=2",
    "--trainer.log_every_n_steps=1",
]


@dataclass(frozen=True)
class Arm:
    """One stage III setting of the STGC callback (loss_weight 0: the baseline, measuring only)."""

    loss_weight: float = 0.0
    loss_type: str = LOSS_TYPES[0]
    selection: str = "gradient"
    gradient: str = "exact"
    mean: str = "all"

    @property
    def name(self) -> str:
        if self.loss_weight == 0:
            return "baseline"
        parts = [self.loss_type, f"lw{self.loss_weight:g}"]
        parts += [f"{key}_{getattr(self, key)}" for key in ("selection", "gradient", "mean")
                  if getattr(self, key) != getattr(Arm, key)]  # fmt: skip
        return "_".join(parts)


# -- one run --------------------------------------------------------------------------------------
def run_args(arm: Arm, seed: int, args: argparse.Namespace) -> list[str]:
    """`stgc fit`/`predict` arguments of one stage III run (its version: <arm>_seed<seed>). The seed
    sets the router initialisation and the data order; the val split stays the data's own (seed 0)."""
    # the arm's settings replace those of the STGC callback in stage3_moe_baseline.yaml
    callback = {"threshold": args.threshold, "histogram_every_n_steps": 0, **asdict(arm)}
    return [
        *stage_args("stage3_baseline", args.log_root, pipeline=args.pipeline),
        f"--trainer.logger.init_args.version={arm.name}_seed{seed}",
        f"--seed_everything={seed}",
        f"--data.init_args.order_seed={seed}",
        f"--model.init_args.init_from={args.stage2}",
        f"--trainer.max_epochs={args.epochs}",
        *(f"--trainer.callbacks.{key}={value}" for key, value in callback.items()),
        *args.extra,
    ]


def modality_split(events: EventAccumulator) -> float:
    """How differently the experts serve image and text tokens at the end: the total variation
    distance between the two modalities' expert loads (0: the same mix of experts; 1: disjoint),
    from each MoE layer's last logged loads, averaged over the layers."""
    loads: dict[tuple[str, str], list[float]] = {}
    for tag in sorted(events.Tags()["scalars"]):
        parts = tag.split("/")  # moe/<layer>/load_<modality>/expert_<e>
        if len(parts) == 4 and parts[0] == "moe" and parts[2] in ("load_image", "load_text"):
            loads.setdefault((parts[1], parts[2]), []).append(events.Scalars(tag)[-1].value)
    layers = {layer for layer, _ in loads}
    distances = [
        0.5 * sum(abs(i - t) for i, t in zip(loads[(layer, "load_image")], loads[(layer, "load_text")], strict=True))
        for layer in sorted(layers)
    ]  # fmt: skip
    return statistics.fmean(distances) if distances else float("nan")


def test_sample_loads(cli) -> dict[str, dict[str, list]]:
    """The trained model's expert load per MoE layer and question family (stgc.study) over
    LOAD_RECORDS test conversations drawn at random (the same ones for every run)."""
    datamodule = cli.datamodule
    datamodule.setup("test")
    dataset = datamodule.datasets["test"]
    drawn = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:LOAD_RECORDS]
    sample = Subset(dataset, sorted(drawn.tolist()))
    return expert_load_by_family(
        cli.model, datamodule.loader(sample, batch_size=datamodule.hparams.eval_batch_size)
    )


def family_split(loads: dict[str, dict[str, list]]) -> float:
    """How differently the experts serve the question families: the total variation distance between
    two families' expert loads (0: the same mix of experts; 1: disjoint), averaged over the pairs of
    families and the MoE layers."""
    distances = [
        0.5 * sum(abs(a - b) for a, b in zip(per_type[s], per_type[t], strict=True))
        for per_type in loads.values()
        for i, s in enumerate(per_type)
        for t in list(per_type)[i + 1 :]
    ]
    return statistics.fmean(distances) if distances else float("nan")


def train_and_answer(arm: Arm, seed: int, args: argparse.Namespace) -> dict:
    """Fit one arm for one seed, then answer the test questions from its last checkpoint."""
    start = time.perf_counter()
    fit = stgc(["fit", *run_args(arm, seed, args)])
    wall_s = time.perf_counter() - start
    loads = test_sample_loads(fit)
    folder = Path(fit.trainer.log_dir)
    answers = folder / "test_answers.jsonl"
    stgc(
        ["predict", *run_args(arm, seed, args), f"--ckpt_path={folder / 'checkpoints' / 'last.ckpt'}",
         f"--answers.path={answers}"]
    )  # fmt: skip
    return record(arm, seed, fit.trainer, wall_s, folder, answers) | {
        "expert_load": loads,
        "load_sample": LOAD_SAMPLE,
    }


def record(arm: Arm, seed: int, trainer, wall_s: float, folder: Path, answers: Path) -> dict:
    """A run's JSON: its setting, budget, val metrics, test accuracies, per-question correctness."""
    scored = answers_correct(answers)
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    val = {k: round(float(v), 5) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return {
        "arm": asdict(arm) | {"name": arm.name},
        "seed": seed,
        "steps": trainer.global_step,
        "wall_s": round(wall_s, 1),
        "val": val,
        "test": accuracies(scored),
        "curves": layer_curves(events, CURVES),
        "modality_split": modality_split(events),
        "questions": scored["key"],
        "types": scored["type"],
        "correct": as_bits(scored["correct"]),
    }


def dense_record(args: argparse.Namespace) -> dict:
    """The stage II model answering the test questions (no stage III)."""
    answers = Path(args.log_root) / args.pipeline / "dense_test_answers.jsonl"
    stgc(
        ["predict", *stage_args(source("stage3_baseline"), args.log_root, pipeline=args.pipeline),
         "--model.init_args.init_from=null", f"--ckpt_path={args.stage2}", f"--answers.path={answers}",
         "--trainer.logger.init_args.version=dense", *args.extra]
    )  # fmt: skip
    scored = answers_correct(answers)
    return {"test": accuracies(scored), "questions": scored["key"],
            "correct": as_bits(scored["correct"])}  # fmt: skip


# -- the study --------------------------------------------------------------------------------
def ensure_stage2(args: argparse.Namespace) -> str:
    """The study's stage II model: --stage2, else the one kept as <out>/<pipeline>/stage2.ckpt (its
    checkpoint without the optimizer's state), else trained through the stages up to stage II under
    --log-root and then kept there. Kept, because a retrained stage II is bit-identical on one
    machine only, and a study resumed elsewhere must start every arm from the same weights. Sets
    args.stage2; returns the digest of the weights."""
    if args.stage2 is None:
        kept = Path(args.out) / args.pipeline / "stage2.ckpt"
        if not kept.is_file():
            trained = last_checkpoint(args.log_root, source("stage3_baseline"), pipeline=args.pipeline)
            if not trained.is_file():
                previous = None
                for stage in chain(source("stage3_baseline"), pipeline=args.pipeline):
                    fit_stage(stage, args.log_root, previous, args.extra, pipeline=args.pipeline)
                    previous = stage
            checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
            torch.save(
                {k: v for k, v in checkpoint.items() if k not in ("optimizer_states", "lr_schedulers")}, kept
            )
        args.stage2 = str(kept)
    state = torch.load(args.stage2, map_location="cpu", weights_only=True)["state_dict"]
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + state[key].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def choose(runs: list[dict]) -> dict:
    """The run with the best val accuracy; ties go to the lower val loss."""
    return min(runs, key=lambda r: (-r["val"]["val/vqa_acc"], r["val"]["val/loss"]))


def as_bits(correct: list[bool]) -> str:
    """Per-question correctness as a run's JSON keeps it: one "1" or "0" per question."""
    return "".join("1" if c else "0" for c in correct)


def bits(run: dict) -> list[bool]:
    """A run's per-question correctness back from its JSON."""
    return [c == "1" for c in run["correct"]]


MAIN_ARMS = ("baseline", "chosen", "control")
CURVE_COLUMNS = (  # column, curve, the last fraction of the run's logged steps it averages (0: the last step)
    ("conflict ratio (last third)", "conflict_ratio", 1 / 3),  # it swings from one batch to the next
    ("reroute rate", "reroute_rate", 1.0),  # at the end the learning rate, hence every step, is ~0
    ("expert drift", "expert_drift", 0.0),
)
DIAGNOSTICS = (*(column for column, _, _ in CURVE_COLUMNS), "image/text split", "family split", "threads")
DELTA = "Δ vs baseline [95% CI, seed-level]"


def paired_difference(reference: list[dict], runs: list[dict]) -> tuple[str, int, dict] | None:
    """`runs` minus `reference` on the seeds both have, as "+d [low, high]" (seed-level 95% interval;
    over questions alone for one seed), the number of paired seeds and the
    interval itself; None when no seed is paired."""
    by_seed = {r["seed"]: r for r in reference}
    paired = [r for r in runs if r["seed"] in by_seed]
    if not paired:
        return None
    ci = paired_interval([bits(by_seed[r["seed"]]) for r in paired], [bits(r) for r in paired])
    return f"{ci['mean']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}]", len(paired), ci


def table_rows(arms: dict[str, list[dict]], dense: dict) -> list[dict[str, str]]:
    """Per arm (after the dense model), its cells by column: seeds, test accuracy (mean over seeds)
    overall and per family, the paired difference to the baseline with its 95% interval; the
    conflict ratio over the run's last third, the reroute rate of the CEL's pairs over the run, the
    expert drift at the end (CURVE_COLUMNS); the image/text and family splits of the experts' loads
    at the end."""
    families = list(dense["test"])[1:]
    rows = [{"arm": "dense (stage II)", "seeds": "–", "test acc": f"{dense['test']['overall']:.4f}"}
            | {f: f"{dense['test'][f]:.4f}" for f in families}]  # fmt: skip
    mean = statistics.fmean
    baseline = arms.get("baseline", [])
    for label, runs in arms.items():
        row = {
            "arm": label,
            "seeds": str(len(runs)),
            "test acc": f"{mean(r['test']['overall'] for r in runs):.4f}",
        }
        row |= {f: f"{mean(r['test'][f] for r in runs):.4f}" for f in families}
        difference = paired_difference(baseline, runs) if label != "baseline" else None
        if difference:  # None: no baseline run of its seeds yet
            row[DELTA] = difference[0]
        for column, name, tail in CURVE_COLUMNS:
            values = [late_mean(r["curves"][name], tail) for r in runs if r["curves"].get(name)]
            if values:
                row[column] = f"{mean(values):.4f}"
        row["image/text split"] = f"{mean(r['modality_split'] for r in runs):.3f}"
        splits = [family_split(r["expert_load"]) for r in runs if "expert_load" in r]  # older runs lack it
        if splits:
            row["family split"] = f"{mean(splits):.3f} (n={len(splits)})"
        row["threads"] = ",".join(str(r.get("threads") or "–") for r in runs)  # "–": not recorded then
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, str]], columns: list[str]) -> str:
    """A markdown table of `columns`; "–" where a row has no such cell."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(row.get(column, "–") for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def plots(arms: dict[str, list[dict]], out: Path, window: int = 5) -> None:
    """Curves per arm (mean and range over seeds, each a moving average over `window` logging steps):
    conflict ratio, cosine vs its null level, reroute rate, expert drift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, 4, figsize=(18, 4))
    titles = ("conflict ratio", "mean cosine (dashed: null level)", "reroute rate", "expert drift")

    def smooth(rows: list[list[float]]) -> np.ndarray:  # (runs, steps - window + 1); all of a short run
        width = min(window, len(rows[0]))
        return np.array([np.convolve(row, np.ones(width) / width, "valid") for row in rows])

    for axis, name, title in zip(axes, ("conflict_ratio", "cosine_mean", "reroute_rate", "expert_drift"),
                                 titles, strict=True):  # fmt: skip
        for label, runs in arms.items():
            series = [r["curves"][name] for r in runs if r["curves"].get(name)]
            if not series:
                continue
            length = min(len(s) for s in series)
            steps = np.array([s for s, _ in series[0][:length]])[min(window, length) - 1 :]
            values = smooth([[v for _, v in s[:length]] for s in series])
            (line,) = axis.plot(steps, values.mean(0), label=f"{label} (n={len(series)})")
            axis.fill_between(steps, values.min(0), values.max(0), alpha=0.2, color=line.get_color())
            if name == "cosine_mean" and runs[0]["curves"].get("cosine_null"):
                null = smooth([[v for _, v in r["curves"]["cosine_null"][:length]] for r in runs])
                axis.plot(steps, null.mean(0), "--", color=line.get_color())
        axis.set(title=title, xlabel=f"step (moving average of {window} logging steps)")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "curves.png", dpi=100)
    plt.close(figure)


def write_readme(results: Path) -> None:
    """Replace the README's Results section body (between RESULTS_MARKERS) with each pipeline's
    summary.md under `results`, in PIPELINES order."""
    text = README.read_text()
    start, end = (text.index(marker) for marker in RESULTS_MARKERS)
    summaries = [results / name / "summary.md" for name in PIPELINES]
    body = "\n".join(path.read_text() for path in summaries if path.is_file())
    README.write_text(text[: start + len(RESULTS_MARKERS[0])] + "\n" + body + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="easy_vqa", choices=list(PIPELINES))
    parser.add_argument("--quick", action="store_true", help="tiny slice and budget: checks the script works")
    parser.add_argument(
        "--stage2", default=None, help="default: <out>/<pipeline>/stage2.ckpt, trained when missing"
    )
    parser.add_argument("--epochs", type=int, default=1, help="stage III epochs of every arm (MoE-LLaVA: 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="of the main comparison")
    parser.add_argument("--loss-weights", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument(
        "--loss-types", nargs="+", default=list(LOSS_TYPES), choices=LOSS_TYPES, help="the forms screened"
    )
    parser.add_argument("--threshold", type=float, default=-0.1)
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["dense", "main", "screen"],
        choices=["dense", "main", "screen"],
        help="dense: the stage II model's answers; screen: the λ sweep and variants; main: seeds of "
        "baseline, chosen, control",
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        default=list(MAIN_ARMS),
        choices=MAIN_ARMS,
        help="of the main comparison, the ones this process trains: two processes can share a seed",
    )
    parser.add_argument("--out", default="results")
    parser.add_argument("--log-root", default="logs/study")
    parser.add_argument("--readme", action="store_true", help="write the README's Results section")
    parser.add_argument(
        "--refresh-loads",
        action="store_true",
        help="redo the expert loads of finished runs sampled otherwise, from their checkpoints under --log-root",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="train nothing: the outputs from the runs in --out alone"
    )
    args, args.extra = parser.parse_known_args()
    if args.quick:
        args.seeds, args.loss_weights, args.epochs = [0, 1], [0.1], 1
        args.out, args.log_root = f"{args.out}/quick", f"{args.log_root}/quick"
        args.extra += QUICK
    out = Path(args.out) / args.pipeline
    (out / "runs").mkdir(parents=True, exist_ok=True)
    dense_path = out / "dense.json"
    if args.report_only:  # the digest the runs must share: the dense record's
        if not dense_path.is_file():
            raise SystemExit(f"--report-only: {dense_path} is missing; run the study first")
        digest = json.loads(dense_path.read_text())["stage2"]
    else:
        # the models need its tokenizer before any DataModule runs (idempotent)
        prepare(Path("data/easy_vqa"))
        digest = ensure_stage2(args)
    start = time.perf_counter()

    def execute(arm: Arm, seed: int) -> dict:
        path = out / "runs" / f"{arm.name}_seed{seed}.json"
        run_dir = Path(args.log_root) / args.pipeline / f"{arm.name}_seed{seed}"
        if path.is_file():
            result = json.loads(path.read_text())
            if result["stage2"] != digest:
                raise SystemExit(f"{path} was trained from another stage II model ({result['stage2']})")
            checkpoint = run_dir / "checkpoints" / "last.ckpt"
            if args.refresh_loads and result.get("load_sample") != LOAD_SAMPLE and checkpoint.is_file():
                cli = stgc(["validate", *run_args(arm, seed, args), f"--ckpt_path={checkpoint}",
                            "--trainer.limit_val_batches=1"])  # fmt: skip
                result |= {"expert_load": test_sample_loads(cli), "load_sample": LOAD_SAMPLE}
                path.write_text(json.dumps(result) + "\n")
            return result
        if args.report_only:
            raise SystemExit(f"--report-only: {path} is missing; run the study without it first")
        print(
            f"== {arm.name} seed {seed} (study elapsed {(time.perf_counter() - start) / 60:.1f} min)",
            flush=True,
        )
        if run_dir.is_dir():  # an interrupted run: its events would mix into the rerun's curves
            shutil.rmtree(run_dir)
        result = train_and_answer(arm, seed, args) | {
            "stage2": digest, "epochs": args.epochs, "threads": torch.get_num_threads(), "data_order_seed": seed
        }  # fmt: skip
        path.write_text(json.dumps(result) + "\n")
        return result

    if "dense" in args.parts and not dense_path.is_file():
        dense_path.write_text(json.dumps(dense_record(args) | {"stage2": digest}) + "\n")
    settings = [Arm(w, form) for form in args.loss_types for w in args.loss_weights]
    # the screen (seed 0), with the baseline's seed 0 first as its reference; one setting: no screen
    baseline = [execute(Arm(), 0)] if len(settings) > 1 else []
    screened = [execute(arm, 0) for arm in settings] if baseline else []
    chosen = (
        Arm(**{k: v for k, v in choose(screened)["arm"].items() if k != "name"}) if screened else settings[0]
    )
    print(f"chosen on val: {chosen.name}" if screened else f"one setting: {chosen.name}", flush=True)
    arms = {"baseline": baseline} | {run["arm"]["name"]: [run] for run in screened}
    control = replace(chosen, selection="random")
    if "main" in args.parts:  # before the variants: the comparison that needs its seeds comes first
        arms |= {
            chosen.name: [r for r in arms.get(chosen.name, []) if r["seed"] in args.seeds],
            control.name: [],
        }
        by_role = dict(zip(MAIN_ARMS, (Arm(), chosen, control), strict=True))
        for seed in args.seeds:  # seed by seed: an unfinished study still has paired runs
            for arm in (by_role[role] for role in args.arms):
                if all(r["seed"] != seed for r in arms[arm.name]):
                    arms[arm.name].append(execute(arm, seed))
    if "screen" in args.parts and screened:
        for variant in (replace(chosen, gradient="output"), replace(chosen, mean="others")):
            arms[variant.name] = [execute(variant, 0)]
    if not dense_path.is_file():
        print(f"{dense_path} is missing (--parts without dense): no table yet")
        return
    arms = {name: runs for name, runs in arms.items() if runs}
    if not arms:
        print(f"no stage III runs in {out}/runs yet (--parts {' '.join(args.parts)}): no table yet")
        return
    dense = json.loads(dense_path.read_text())
    rows = table_rows(arms, dense)
    full = markdown(rows, ["arm", "seeds", "test acc", *list(dense["test"])[1:], DELTA, *DIAGNOSTICS])
    (out / "results.md").write_text(full + "\n")
    plots({name: arms[name] for name in ("baseline", chosen.name, control.name) if arms.get(name)}, out)
    print(full)
    runs = [r for runs in arms.values() for r in runs]
    wall_h = sum(r["wall_s"] for r in runs) / 3600
    print(f"study: {wall_h:.2f} h of stage III training; outputs in {out}/")
    main_rows = [
        row for row in rows if row["arm"] in ("dense (stage II)", "baseline", chosen.name, control.name)
    ]
    gradient_vs_random = ""
    difference = paired_difference(arms.get(control.name, []), arms.get(chosen.name, []))
    if difference:  # does choosing by the gradient matter: the chosen arm minus the control
        text, seeds, ci = difference
        gradient_vs_random = (
            f"\n`{chosen.name}` minus its random control, paired over {seeds} seed(s): {text}. The study "
            f"rules out a gain above {ci['high'] * 100:.1f} points and a loss above {-ci['low'] * 100:.1f} "
            "points (seed-level 95% interval); it cannot tell smaller differences apart.\n"
        )
    setting = (f"chosen on val: `{chosen.name}`" if screened
               else f"one setting, not screened on this pipeline: `{chosen.name}`")  # fmt: skip
    (out / "summary.md").write_text(
        f"**{args.pipeline}**: {len(runs)} stage III runs of {runs[0]['steps']:,} steps "
        f"({wall_h:.1f} h of training, summed over runs); {setting}; "
        f"per family and diagnostics: [results/{args.pipeline}/results.md](results/{args.pipeline}/results.md)\n\n"
        + markdown(main_rows, ["arm", "seeds", "test acc", DELTA]) + "\n" + gradient_vs_random
    )  # fmt: skip
    if args.readme:
        write_readme(Path(args.out))


if __name__ == "__main__":
    main()
