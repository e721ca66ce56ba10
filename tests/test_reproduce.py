"""scripts/reproduce.py --quick: the study runs end to end on a tiny slice and writes its outputs."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from stgc.method.loss import LOSS_TYPES

pytestmark = pytest.mark.slow  # the whole quick study, a dozen fits: test_study checks its parts

ROOT = Path(__file__).resolve().parents[1]


def test_quick_study_writes_runs_table_and_plots(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # configs/ and the bundled data/easy_vqa (prepared if missing) live there
    argv = [
        "reproduce.py",
        "--quick",
        "--out",
        str(tmp_path / "results"),
        "--log-root",
        str(tmp_path / "logs"),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "scripts" / "reproduce.py"), run_name="__main__")
    out = tmp_path / "results" / "quick" / "easy_vqa"
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    screened = [f"{form}_lw0.1_seed0" for form in LOSS_TYPES]
    chosen = next(name[: -len("_seed1")] for name in runs if name.endswith("_seed1") and "random" not in name
                  and name != "baseline_seed1")  # fmt: skip
    assert sorted(runs) == sorted(
        ["baseline_seed0", "baseline_seed1", *screened, f"{chosen}_seed1",
         f"{chosen}_gradient_output_seed0", f"{chosen}_mean_others_seed0",
         f"{chosen}_selection_random_seed0", f"{chosen}_selection_random_seed1"]
    )  # fmt: skip
    baseline, control = runs["baseline_seed0"], runs[f"{chosen}_selection_random_seed0"]
    assert control["arm"]["selection"] == "random" and control["arm"]["loss_weight"] == 0.1
    for run in (baseline, control):
        assert run["curves"]["conflict_ratio"] and run["curves"]["reroute_rate"], "both arms measure"
        assert len(run["correct"]) == len(run["questions"]) == len(baseline["questions"]) > 0
        assert run["questions"] == baseline["questions"], "paired: the same questions in the same order"
        assert 0.0 <= run["test"]["overall"] <= 1.0 and "val/vqa_acc" in run["val"]
        for per_family in run["expert_load"].values():  # per MoE layer: a load per question family
            assert set(per_family) <= set(run["test"]) and len(per_family) > 1
            assert all(abs(sum(load) - 1) < 1e-5 for load in per_family.values())
    table = (out / "results.md").read_text()
    assert "| dense (stage II) |" in table and "| baseline | 2 |" in table and "family split" in table
    widths = {line.count("|") for line in table.splitlines()}
    assert len(widths) == 1, "every row, the separator included, has as many columns as the header"
    assert f"| {chosen}_selection_random | 2 |" in table
    header = [cell.strip() for cell in table.splitlines()[0].split("|")]
    row = next(line for line in table.splitlines() if line.startswith("| baseline |"))
    late = []  # per baseline seed, the conflict ratio over the last third of its logged steps
    for seed in (0, 1):
        values = [v for _, v in runs[f"baseline_seed{seed}"]["curves"]["conflict_ratio"]]
        late.append(sum(values[-max(1, round(len(values) / 3)) :]) / max(1, round(len(values) / 3)))
    cell = row.split("|")[header.index("conflict ratio (last third)")]
    assert float(cell) == pytest.approx(sum(late) / 2, abs=5e-5)
    assert (out / "curves.png").stat().st_size > 0
    kept = torch.load(
        out / "stage2.ckpt", map_location="cpu", weights_only=True
    )  # what every arm started from
    assert "optimizer_states" not in kept and kept["state_dict"] and kept["global_step"] > 0
    summary = (out / "summary.md").read_text()
    assert f"| {chosen} | 2 |" in summary and "minus its random control, paired over 2 seed(s)" in summary

    # --refresh-loads: a run whose loads were sampled otherwise gets them again from its checkpoint
    stale = out / "runs" / "baseline_seed0.json"
    stale.write_text(json.dumps(baseline | {"expert_load": {}, "load_sample": "strided"}) + "\n")
    monkeypatch.setattr(sys, "argv", [*argv, "--refresh-loads"])
    runpy.run_path(str(ROOT / "scripts" / "reproduce.py"), run_name="__main__")
    refreshed = json.loads(stale.read_text())
    assert (
        refreshed["expert_load"] == baseline["expert_load"]
        and refreshed["load_sample"] == baseline["load_sample"]
    )

    # --report-only: the same outputs from the runs alone; a missing run is named, not trained
    (out / "results.md").unlink()
    monkeypatch.setattr(sys, "argv", [*argv, "--report-only"])
    runpy.run_path(str(ROOT / "scripts" / "reproduce.py"), run_name="__main__")
    assert (out / "results.md").read_text() == table
    (out / "runs" / "baseline_seed1.json").unlink()
    with pytest.raises(SystemExit, match="baseline_seed1.json is missing"):
        runpy.run_path(str(ROOT / "scripts" / "reproduce.py"), run_name="__main__")

    # --arms: a process trains (here: reads) only its share of the main comparison's arms
    monkeypatch.setattr(sys, "argv", [*argv, "--report-only", "--arms", "chosen", "control"])
    runpy.run_path(str(ROOT / "scripts" / "reproduce.py"), run_name="__main__")
    table = (out / "results.md").read_text()
    assert "| baseline | 1 |" in table and f"| {chosen}_selection_random | 2 |" in table

    # one setting and no main comparison: no run to tabulate is said, not a crash
    monkeypatch.setattr(
        sys, "argv", [*argv, "--report-only", "--parts", "dense", "--loss-types", "unlikelihood"]
    )
    runpy.run_path(str(ROOT / "scripts" / "reproduce.py"), run_name="__main__")
    assert (out / "results.md").read_text() == table, "left as it was"
