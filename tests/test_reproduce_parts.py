"""stgc_experiments.reproduce without training: the arms' names and arguments, the kept stage II model,
and the study from run JSONs alone (report_only) to its tables, curves, summary and README section."""

import json
from dataclasses import asdict, replace

import pytest
import torch

from stgc_experiments import ROOT
from stgc_experiments.reproduce import (
    DELTA,
    QUICK,
    RESULTS_MARKERS,
    Arm,
    Study,
    as_bits,
    bits,
    choose,
    ensure_stage2,
    paired_difference,
    run_args,
    run_arms,
    run_study,
    write_readme,
)
from stgc_experiments.study import family_split, late_mean, modality_split, paired_interval

FAMILIES = {"yes_no": 0.5, "color": 0.5}
CHOSEN = Arm(0.1, "unlikelihood")
CONTROL = replace(CHOSEN, selection="random")


def run_json(arm: Arm, seed: int, correct: str, val_acc: float = 0.5) -> dict:
    """A finished run's JSON as reproduce.arm_run writes it (from stage II model "d"), its curves three
    logged steps long."""
    curve = [[step, 0.1 * (seed + 1) * (step + 1)] for step in range(3)]
    return {
        "arm": asdict(arm) | {"name": arm.name}, "seed": seed, "steps": 12, "wall_s": 36.0,
        "val": {"val/vqa_acc": val_acc, "val/loss": 1.0},
        "test": {"overall": correct.count("1") / len(correct), **FAMILIES},
        "curves": dict.fromkeys(("conflict_ratio", "cosine_mean", "cosine_null", "reroute_rate", "expert_drift"), curve),
        "modality_split": 0.25, "questions": [f"q{i}" for i in range(len(correct))], "correct": correct,
        "expert_load": {"layer_0": {"yes_no": [0.5, 0.5], "color": [1.0, 0.0]}}, "stage2": "d", "threads": 1,
    }  # fmt: skip


def write_runs(study: Study, runs: list[dict]) -> None:
    """The dense record and the runs' JSONs in the study's folder."""
    (study.folder / "runs").mkdir(parents=True, exist_ok=True)
    dense = {"test": {"overall": 0.5, **FAMILIES}, "questions": ["q0", "q1", "q2", "q3"], "correct": "1100"}
    (study.folder / "dense.json").write_text(json.dumps(dense | {"stage2": "d"}))
    for run in runs:
        (study.folder / "runs" / f"{run['arm']['name']}_seed{run['seed']}.json").write_text(json.dumps(run))


def test_arm_names_and_their_run_arguments() -> None:
    assert (Arm().name, CHOSEN.name) == ("baseline", "unlikelihood_lw0.1")
    assert replace(CONTROL, mean="others").name == "unlikelihood_lw0.1_selection_random_mean_others"
    args = run_args(
        CHOSEN, 1, Study(stage2="stage2.ckpt", epochs=2, extra=("--trainer.limit_train_batches=3",))
    )
    assert args[:2] == ["-c", "configs/trainer.yaml"] and "configs/easy_vqa/stage3_moe_baseline.yaml" in args
    for arg in ("--trainer.logger.init_args.version=unlikelihood_lw0.1_seed1", "--seed_everything=1",
                "--data.init_args.order_seed=1", "--model.init_args.init_from=stage2.ckpt", "--trainer.max_epochs=2",
                "--trainer.callbacks.threshold=-0.1", "--trainer.callbacks.loss_weight=0.1",
                "--trainer.callbacks.loss_type=unlikelihood", "--trainer.callbacks.histogram_every_n_steps=0"):  # fmt: skip
        assert arg in args, arg
    assert args[-1] == "--trainer.limit_train_batches=3", "the extra arguments come last: they win"


def test_a_studys_relative_paths_are_the_repository_roots(tmp_path) -> None:
    assert Study().folder == ROOT / "results" / "easy_vqa"
    assert Study().logs == ROOT / "logs" / "study" / "easy_vqa"
    assert Study(out=str(tmp_path), pipeline="mix").folder == tmp_path / "mix"
    quick = Study(extra=("--a",)).quick()
    assert (quick.seeds, quick.loss_weights, quick.extra) == ((0, 1), (0.1,), ("--a", *QUICK))
    assert (quick.out, quick.log_root) == ("results/quick", "logs/study/quick")


def test_the_splits_of_the_experts_loads() -> None:
    class Events:  # the two EventAccumulator methods modality_split reads
        scalars = {"moe/layer_0/load_image/expert_0": 1.0, "moe/layer_0/load_image/expert_1": 0.0,
                   "moe/layer_0/load_text/expert_0": 0.0, "moe/layer_0/load_text/expert_1": 1.0,
                   "moe/layer_1/load_image/expert_0": 0.5, "moe/layer_1/load_image/expert_1": 0.5,
                   "moe/layer_1/load_text/expert_0": 0.5, "moe/layer_1/load_text/expert_1": 0.5,
                   "stgc/conflict_ratio/layer_0": 0.3}  # fmt: skip

        def Tags(self) -> dict:
            return {"scalars": list(self.scalars)}

        def Scalars(self, tag: str) -> list:  # the last event is the tag's value
            return [type("Event", (), {"value": -1.0})(), type("Event", (), {"value": self.scalars[tag]})()]

    assert modality_split(Events()) == pytest.approx(0.5)  # disjoint in layer 0 (1), the same in layer 1 (0)
    loads = {"layer_0": {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 0.0]}}
    assert family_split(loads) == pytest.approx(2 / 3)  # a-b 1, a-c 0, b-c 1


def test_paired_difference_and_the_choice_on_val() -> None:
    assert bits({"correct": as_bits([True, False, True])}) == [True, False, True]
    baseline = [run_json(Arm(), 0, "1100"), run_json(Arm(), 1, "1010")]
    arm = [run_json(CHOSEN, 1, "1110"), run_json(CHOSEN, 2, "1111")]
    assert paired_difference(baseline, [run_json(CHOSEN, 5, "1111")]) is None
    text, seeds, ci = paired_difference(baseline, arm)  # seed 1 alone is paired
    assert seeds == 1 and ci == paired_interval([bits(baseline[1])], [bits(arm[0])])
    assert text == f"{ci['mean']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}]" and ci["mean"] == 0.25
    runs = [
        run_json(Arm(0.01), 0, "1", 0.6),
        run_json(Arm(0.1), 0, "1", 0.7),
        run_json(Arm(1.0), 0, "1", 0.7),
    ]
    runs[2]["val"]["val/loss"] = 0.5
    assert choose(runs) is runs[2], "the best val accuracy; a tie to the lower val loss"


def test_the_screen_chooses_on_val_then_runs_the_variants_of_the_choice(tmp_path) -> None:
    study = Study(out=str(tmp_path), report_only=True, parts=("screen",), loss_types=("unlikelihood",))
    screened = [Arm(), Arm(0.01, "unlikelihood"), CHOSEN]
    variants = [replace(CHOSEN, gradient="output"), replace(CHOSEN, mean="others")]
    write_runs(
        study,
        [run_json(arm, 0, "1100", val_acc=0.7 if arm == CHOSEN else 0.5) for arm in screened + variants],
    )
    arms, chosen, was_screened = run_arms(study, "d", 0.0)
    assert was_screened and chosen == CHOSEN and list(arms) == [arm.name for arm in screened + variants]
    with pytest.raises(SystemExit, match="another stage II model"):
        run_arms(study, "other digest", 0.0)
    (study.folder / "runs" / "unlikelihood_lw0.1_mean_others_seed0.json").unlink()
    with pytest.raises(SystemExit, match="unlikelihood_lw0.1_mean_others_seed0.json is missing"):
        run_arms(study, "d", 0.0)


def test_the_report_of_a_main_comparison_from_its_runs(tmp_path, capsys) -> None:
    study = Study(out=str(tmp_path), report_only=True, parts=("dense", "main"), seeds=(0, 1),
                  loss_types=("unlikelihood",), loss_weights=(0.1,))  # fmt: skip
    chosen, control = CHOSEN.name, CONTROL.name
    runs = {arm.name: [run_json(arm, seed, answers) for seed, answers in enumerate(per_seed)]
            for arm, per_seed in ((Arm(), ("1100", "1010")), (CHOSEN, ("1110", "1011")), (CONTROL, ("1100", "0011")))}  # fmt: skip
    write_runs(study, [run for per_arm in runs.values() for run in per_arm])
    run_study(study)
    table = (study.folder / "results.md").read_text()
    lines = table.splitlines()
    assert len({line.count("|") for line in lines}) == 1, "every row has as many columns as the header"
    header = [cell.strip() for cell in lines[0].split("|")]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")] for line in lines[2:]}
    assert list(rows) == ["dense (stage II)", "baseline", chosen, control]
    assert rows["baseline"][header.index("seeds")] == "2" and rows["baseline"][header.index(DELTA)] == "–"
    assert rows[chosen][header.index(DELTA)] == paired_difference(runs["baseline"], runs[chosen])[0]
    late = [late_mean(run["curves"]["conflict_ratio"], 1 / 3) for run in runs["baseline"]]
    assert float(rows["baseline"][header.index("conflict ratio (last third)")]) == pytest.approx(
        sum(late) / 2
    )
    assert rows[chosen][header.index("family split")] == "0.500 (n=2)"
    assert (study.folder / "curves.png").stat().st_size > 0
    summary = (study.folder / "summary.md").read_text()
    assert summary.startswith("**easy_vqa**: 6 stage III runs of 12 steps (0.1 h of training")
    assert f"one setting, not screened on this pipeline: `{chosen}`" in summary
    assert f"`{chosen}` minus its random control, paired over 2 seed(s)" in summary
    assert "study: 0.06 h of stage III training" in capsys.readouterr().out

    (study.folder / "results.md").unlink()  # one setting and no main comparison: nothing to tabulate
    run_study(replace(study, parts=("dense",)))
    assert "no stage III runs" in capsys.readouterr().out and not (study.folder / "results.md").exists()


def test_write_readme_puts_each_pipelines_summary_between_the_markers(tmp_path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{RESULTS_MARKERS[0]}\nold results\n{RESULTS_MARKERS[1]}\nafter\n")
    for pipeline in ("mix", "easy_vqa"):
        (tmp_path / "results" / pipeline).mkdir(parents=True)
        (tmp_path / "results" / pipeline / "summary.md").write_text(f"{pipeline} summary\n")
    write_readme(tmp_path / "results", readme)
    expected = (
        f"# title\n{RESULTS_MARKERS[0]}\neasy_vqa summary\n\nmix summary\n{RESULTS_MARKERS[1]}\nafter\n"
    )
    assert readme.read_text() == expected  # PIPELINES' order; the rest of the README untouched
    write_readme(tmp_path / "results", readme)
    assert readme.read_text() == expected


def test_ensure_stage2_keeps_the_trained_model_without_its_optimizer_state(tmp_path) -> None:
    study = Study(out=str(tmp_path / "results"), log_root=str(tmp_path / "logs"))
    trained = tmp_path / "logs" / "easy_vqa" / "stage2" / "checkpoints" / "last.ckpt"
    trained.parent.mkdir(parents=True)
    state = {"w": torch.arange(4.0), "b": torch.zeros(2)}
    torch.save(
        {"state_dict": state, "optimizer_states": [{"state": {}}], "lr_schedulers": [], "global_step": 3},
        trained,
    )
    path, digest = ensure_stage2(study)  # the stage II checkpoint is there: nothing trains
    kept = torch.load(path, map_location="cpu", weights_only=True)
    assert path == study.folder / "stage2.ckpt" and set(kept) == {"state_dict", "global_step"}
    trained.unlink()
    assert ensure_stage2(study) == (path, digest), "the kept model, not retrained"
    assert ensure_stage2(Study(stage2=str(path))) == (path, digest) and len(digest) == 16
    torch.save({"state_dict": state | {"w": torch.arange(4.0) + 1}}, path)
    assert ensure_stage2(study)[1] != digest
