"""The STGC study that scripts/reproduce.py runs (its docstring says what it compares): stage III arms
trained from one stage II model, one JSON per run, and the tables, curves and summary written from them.

Independent of the working directory, as the pipeline is: a Study's relative paths (out, log_root,
stage2) are the repository root's (ROOT), and every `stgc` runs there.
"""

import contextlib
import hashlib
import json
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import Subset

from stgc.easy_vqa.prepare import prepare
from stgc.method import Settings, names
from stgc.method.loss import LOSS_TYPES
from stgc_experiments import ROOT
from stgc_experiments.pipeline import (
    DEFAULT,
    PIPELINES,
    chain,
    fit_stage,
    last_checkpoint,
    source,
    stage_args,
    stgc_at_root,
)
from stgc_experiments.study import (
    accuracies,
    answers_correct,
    expert_load_by_family,
    family_split,
    late_mean,
    layer_curves,
    modality_split,
    paired_interval,
)

README = ROOT / "README.md"
RESULTS_MARKERS = ("<!-- results: written by scripts/reproduce.py -->", "<!-- results: end -->")
LOAD_RECORDS = (
    2048  # test conversations, drawn at random (seed 0), whose routing gives the expert load per family
)
# how a run's expert loads were sampled: an evenly strided sample, as before, aliased with Sort-of-CLEVR's
# 12 questions per image (it met one subtype only); --refresh-loads redoes older runs from their checkpoints
LOAD_SAMPLE = f"random{LOAD_RECORDS}"
CURVES = (names.CONFLICT_RATIO, names.COSINE_MEAN, names.COSINE_NULL, names.REROUTE_RATE, names.EXPERT_DRIFT)
QUICK = (  # a tiny slice and budget: checks that the study runs end to end
    "--data.init_args.limit_records=48",
    "--data.init_args.val_fraction=0.25",
    "--data.init_args.batch_size=8",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_predict_batches=2",
    "--trainer.log_every_n_steps=1",
)
PARTS = ("dense", "main", "screen")
MAIN_ARMS = ("baseline", "chosen", "control")
CURVE_COLUMNS = (  # column, curve, the last fraction of the run's logged steps it averages (0: the last step)
    ("conflict ratio (last third)", names.CONFLICT_RATIO, 1 / 3),  # it swings from one batch to the next
    ("reroute rate", names.REROUTE_RATE, 1.0),  # at the end the learning rate, hence every step, is ~0
    ("expert drift", names.EXPERT_DRIFT, 0.0),
)
DIAGNOSTICS = (*(column for column, _, _ in CURVE_COLUMNS), "image/text split", "family split", "threads")
DELTA = "Δ vs baseline [95% CI, seed-level]"


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


@dataclass(frozen=True)
class Study:
    """What one study is asked to do: scripts/reproduce.py's flags (their help says what each does),
    `extra` the arguments it passes on to every `stgc` run. Relative paths are ROOT's."""

    pipeline: str = DEFAULT
    stage2: str | None = None
    epochs: int = 1
    seeds: Sequence[int] = (0, 1, 2)
    loss_weights: Sequence[float] = (0.01, 0.1)
    loss_types: Sequence[str] = LOSS_TYPES
    threshold: float = Settings.threshold
    parts: Sequence[str] = PARTS
    arms: Sequence[str] = MAIN_ARMS
    out: str = "results"
    log_root: str = "logs/study"
    readme: bool = False
    refresh_loads: bool = False
    report_only: bool = False
    extra: Sequence[str] = ()

    @property
    def folder(self) -> Path:
        """The pipeline's outputs: runs/<run>.json, dense.json, stage2.ckpt, results.md, summary.md, curves.png."""
        return ROOT / self.out / self.pipeline

    @property
    def logs(self) -> Path:
        """The pipeline's run folders (logs and checkpoints), one per run."""
        return ROOT / self.log_root / self.pipeline

    def quick(self) -> "Study":
        """Two seeds, one λ and QUICK's tiny slice, under <out>/quick and <log_root>/quick."""
        return replace(
            self, seeds=(0, 1), loss_weights=(0.1,), epochs=1, out=f"{self.out}/quick",
            log_root=f"{self.log_root}/quick", extra=(*self.extra, *QUICK),
        )  # fmt: skip


# -- one run --------------------------------------------------------------------------------------
def run_args(arm: Arm, seed: int, study: Study) -> list[str]:
    """`stgc fit`/`predict` arguments of one stage III run (its version: <arm>_seed<seed>). The seed
    sets the router initialisation and the data order; the val split stays the data's own (seed 0)."""
    # the arm's settings replace those of the STGC callback in stage3_moe_baseline.yaml
    callback = {"threshold": study.threshold, "histogram_every_n_steps": 0, **asdict(arm)}
    return [
        *stage_args("stage3_baseline", study.log_root, pipeline=study.pipeline),
        f"--trainer.logger.init_args.version={arm.name}_seed{seed}",
        f"--seed_everything={seed}",
        f"--data.init_args.order_seed={seed}",
        f"--model.init_args.init_from={study.stage2}",
        f"--trainer.max_epochs={study.epochs}",
        *(f"--trainer.callbacks.{key}={value}" for key, value in callback.items()),
        *study.extra,
    ]


def sampled_loads(cli: LightningCLI) -> dict[str, dict[str, list]]:
    """The trained model's expert load per MoE layer and question family (expert_load_by_family) over
    LOAD_RECORDS test conversations drawn at random (the same ones for every run)."""
    datamodule = cli.datamodule
    with contextlib.chdir(ROOT):  # the data's paths, as the configs give them
        datamodule.setup("test")
        dataset = datamodule.datasets["test"]
        drawn = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:LOAD_RECORDS]
        sample = Subset(dataset, sorted(drawn.tolist()))
        return expert_load_by_family(
            cli.model, datamodule.loader(sample, batch_size=datamodule.hparams.eval_batch_size)
        )


def train_and_answer(arm: Arm, seed: int, study: Study) -> dict:
    """Fit one arm for one seed, then answer the test questions from its last checkpoint."""
    start = time.perf_counter()
    fit = stgc_at_root(["fit", *run_args(arm, seed, study)])
    wall_s = time.perf_counter() - start
    loads = sampled_loads(fit)
    folder = ROOT / fit.trainer.log_dir
    answers = folder / "test_answers.jsonl"
    stgc_at_root(
        ["predict", *run_args(arm, seed, study), f"--ckpt_path={folder / 'checkpoints' / 'last.ckpt'}",
         f"--answers.path={answers}"]
    )  # fmt: skip
    return record(arm, seed, fit.trainer, wall_s, folder, answers) | {
        "expert_load": loads,
        "load_sample": LOAD_SAMPLE,
    }


def record(arm: Arm, seed: int, trainer: Trainer, wall_s: float, folder: Path, answers: Path) -> dict:
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


def dense_record(study: Study) -> dict:
    """The stage II model answering the test questions (no stage III)."""
    answers = study.logs / "dense_test_answers.jsonl"
    stgc_at_root(
        ["predict", *stage_args(source("stage3_baseline", pipeline=study.pipeline), study.log_root,
                                pipeline=study.pipeline),
         "--model.init_args.init_from=null", f"--ckpt_path={study.stage2}", f"--answers.path={answers}",
         "--trainer.logger.init_args.version=dense", *study.extra]
    )  # fmt: skip
    scored = answers_correct(answers)
    return {"test": accuracies(scored), "questions": scored["key"],
            "correct": as_bits(scored["correct"])}  # fmt: skip


def as_bits(correct: list[bool]) -> str:
    """Per-question correctness as a run's JSON keeps it: one "1" or "0" per question."""
    return "".join("1" if c else "0" for c in correct)


def bits(run: dict) -> list[bool]:
    """A run's per-question correctness back from its JSON."""
    return [c == "1" for c in run["correct"]]


# -- the study --------------------------------------------------------------------------------
def ensure_stage2(study: Study) -> tuple[Path, str]:
    """The study's stage II model and its weights' digest: study.stage2, else the one kept as
    <folder>/stage2.ckpt (its checkpoint without the optimizer's state), else trained through the
    stages up to stage II under log_root and then kept there. Kept, because a retrained stage II is
    bit-identical on one machine only, and a study resumed elsewhere must start every arm from the
    same weights."""
    if study.stage2 is not None:
        path = ROOT / study.stage2
    else:
        path = study.folder / "stage2.ckpt"
        if not path.is_file():
            dense = source("stage3_baseline", pipeline=study.pipeline)
            trained = last_checkpoint(study.log_root, dense, pipeline=study.pipeline)
            if not trained.is_file():
                previous = None
                for stage in chain(dense, pipeline=study.pipeline):
                    fit_stage(stage, study.log_root, previous, list(study.extra), pipeline=study.pipeline)
                    previous = stage
            checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {k: v for k, v in checkpoint.items() if k not in ("optimizer_states", "lr_schedulers")}, path
            )
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + state[key].cpu().numpy().tobytes())
    return path, digest.hexdigest()[:16]


def arm_run(study: Study, arm: Arm, seed: int, digest: str, start: float) -> dict:
    """One arm's run for one seed: its JSON in <folder>/runs when there (it must come from the stage II
    model of `digest`; refresh_loads redoes expert loads sampled otherwise), else trained and answered
    (an interrupted run's folder removed first) and its JSON written; with report_only, an error.
    `start`: when the study started (perf_counter), for the progress line."""
    path = study.folder / "runs" / f"{arm.name}_seed{seed}.json"
    run_dir = study.logs / f"{arm.name}_seed{seed}"
    if path.is_file():
        result = json.loads(path.read_text())
        if result["stage2"] != digest:
            raise SystemExit(f"{path} was trained from another stage II model ({result['stage2']})")
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        if study.refresh_loads and result.get("load_sample") != LOAD_SAMPLE and checkpoint.is_file():
            cli = stgc_at_root(["validate", *run_args(arm, seed, study), f"--ckpt_path={checkpoint}",
                                "--trainer.limit_val_batches=1"])  # fmt: skip
            result |= {"expert_load": sampled_loads(cli), "load_sample": LOAD_SAMPLE}
            path.write_text(json.dumps(result) + "\n")
        return result
    if study.report_only:
        raise SystemExit(f"--report-only: {path} is missing; run the study without it first")
    print(
        f"== {arm.name} seed {seed} (study elapsed {(time.perf_counter() - start) / 60:.1f} min)",
        flush=True,
    )
    if run_dir.is_dir():  # an interrupted run: its events would mix into the rerun's curves
        shutil.rmtree(run_dir)
    result = train_and_answer(arm, seed, study) | {
        "stage2": digest, "epochs": study.epochs, "threads": torch.get_num_threads(), "data_order_seed": seed
    }  # fmt: skip
    path.write_text(json.dumps(result) + "\n")
    return result


def choose(runs: list[dict]) -> dict:
    """The run with the best val accuracy; ties go to the lower val loss."""
    return min(runs, key=lambda r: (-r["val"]["val/vqa_acc"], r["val"]["val/loss"]))


def run_arms(study: Study, digest: str, start: float) -> tuple[dict[str, list[dict]], Arm, bool]:
    """The stage III runs of the study's parts, in order: the screen (seed 0: the baseline, then every
    loss form at every λ; none for one setting), the main comparison seed by seed (study.arms' roles),
    the variants (seed 0). Returns the runs per arm name, the chosen setting and whether it was screened."""
    settings = [Arm(w, form) for form in study.loss_types for w in study.loss_weights]
    baseline = [arm_run(study, Arm(), 0, digest, start)] if len(settings) > 1 else []
    screened = [arm_run(study, arm, 0, digest, start) for arm in settings] if baseline else []
    chosen = (
        Arm(**{k: v for k, v in choose(screened)["arm"].items() if k != "name"}) if screened else settings[0]
    )
    print(f"chosen on val: {chosen.name}" if screened else f"one setting: {chosen.name}", flush=True)
    arms = {"baseline": baseline} | {run["arm"]["name"]: [run] for run in screened}
    control = replace(chosen, selection="random")
    if "main" in study.parts:  # before the variants: the comparison that needs its seeds comes first
        arms |= {
            chosen.name: [r for r in arms.get(chosen.name, []) if r["seed"] in study.seeds],
            control.name: [],
        }
        by_role = dict(zip(MAIN_ARMS, (Arm(), chosen, control), strict=True))
        for seed in study.seeds:  # seed by seed: an unfinished study still has paired runs
            for arm in (by_role[role] for role in study.arms):
                if all(r["seed"] != seed for r in arms[arm.name]):
                    arms[arm.name].append(arm_run(study, arm, seed, digest, start))
    if "screen" in study.parts and screened:
        for variant in (replace(chosen, gradient="output"), replace(chosen, mean="others")):
            arms[variant.name] = [arm_run(study, variant, 0, digest, start)]
    return arms, chosen, bool(screened)


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

    figure, axes = plt.subplots(1, 4, figsize=(18, 4))
    titles = ("conflict ratio", "mean cosine (dashed: null level)", "reroute rate", "expert drift")

    def smooth(rows: list[list[float]]) -> np.ndarray:  # (runs, steps - window + 1); all of a short run
        width = min(window, len(rows[0]))
        return np.array([np.convolve(row, np.ones(width) / width, "valid") for row in rows])

    for axis, name, title in zip(axes, (names.CONFLICT_RATIO, names.COSINE_MEAN, names.REROUTE_RATE, names.EXPERT_DRIFT),
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
            if name == names.COSINE_MEAN and runs[0]["curves"].get(names.COSINE_NULL):
                null = smooth([[v for _, v in r["curves"][names.COSINE_NULL][:length]] for r in runs])
                axis.plot(steps, null.mean(0), "--", color=line.get_color())
        axis.set(title=title, xlabel=f"step (moving average of {window} logging steps)")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "curves.png", dpi=100)
    plt.close(figure)


def write_readme(results: Path, readme: Path = README) -> None:
    """Replace the README's Results section body (between RESULTS_MARKERS) with each pipeline's
    summary.md under `results`, in PIPELINES order."""
    text = readme.read_text()
    start, end = (text.index(marker) for marker in RESULTS_MARKERS)
    summaries = [results / name / "summary.md" for name in PIPELINES]
    body = "\n".join(path.read_text() for path in summaries if path.is_file())
    readme.write_text(text[: start + len(RESULTS_MARKERS[0])] + "\n" + body + text[end:])


def report(study: Study, arms: dict[str, list[dict]], chosen: Arm, screened: bool) -> None:
    """From the dense record and the runs: results.md (every arm), curves.png (the main comparison's
    arms) and summary.md (those, and the chosen arm minus its random control) in study.folder, and
    with study.readme the README's Results section. Without the dense record or any run: says so."""
    out = study.folder
    dense_path = out / "dense.json"
    if not dense_path.is_file():
        print(f"{dense_path} is missing (--parts without dense): no table yet")
        return
    arms = {name: runs for name, runs in arms.items() if runs}
    if not arms:
        print(f"no stage III runs in {out}/runs yet (--parts {' '.join(study.parts)}): no table yet")
        return
    control = replace(chosen, selection="random")
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
        f"**{study.pipeline}**: {len(runs)} stage III runs of {runs[0]['steps']:,} steps "
        f"({wall_h:.1f} h of training, summed over runs); {setting}; "
        f"per family and diagnostics: [results/{study.pipeline}/results.md](results/{study.pipeline}/results.md)\n\n"
        + markdown(main_rows, ["arm", "seeds", "test acc", DELTA]) + "\n" + gradient_vs_random
    )  # fmt: skip
    if study.readme:
        write_readme(ROOT / study.out)


def run_study(study: Study) -> None:
    """The whole study, resumable run by run: its stage II model (kept; report_only: the digest of the
    dense record's), the dense model's answers, the stage III runs (run_arms), then `report`."""
    (study.folder / "runs").mkdir(parents=True, exist_ok=True)
    dense_path = study.folder / "dense.json"
    if study.report_only:  # the digest the runs must share: the dense record's
        if not dense_path.is_file():
            raise SystemExit(f"--report-only: {dense_path} is missing; run the study first")
        digest = json.loads(dense_path.read_text())["stage2"]
    else:
        # the models need its tokenizer before any DataModule runs (idempotent)
        prepare(ROOT / "data" / "easy_vqa")
        stage2, digest = ensure_stage2(study)
        study = replace(study, stage2=str(stage2))
    start = time.perf_counter()
    if "dense" in study.parts and not dense_path.is_file():
        dense_path.write_text(json.dumps(dense_record(study) | {"stage2": digest}) + "\n")
    arms, chosen, screened = run_arms(study, digest, start)
    report(study, arms, chosen, screened)
