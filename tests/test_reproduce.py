"""scripts/reproduce.py --quick: the study runs end to end on a tiny slice and writes its outputs."""

import json
import runpy
import sys
from pathlib import Path

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
    out = tmp_path / "results" / "quick"
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    # the second seed runs the sweep setting with the better val accuracy
    chosen = next(name for name in runs if name.endswith("seed1") and name.startswith("stgc"))[7:-11]
    assert sorted(runs) == sorted(
        [
            "baseline_seed0",
            "baseline_seed1",
            "plain_seed0",
            "stgc_lw0.1_tau0_seed0",
            "stgc_lw1_tau0_seed0",
            f"stgc_lw{chosen}_tau0_seed1",
        ]
    ) and chosen in ("0.1", "1")
    baseline, plain = runs["baseline_seed0"], runs["plain_seed0"]
    assert baseline["curves"]["conflict_ratio"], "the baseline measures conflicts too"
    assert "test/vqa_acc" in baseline["metrics"] and "val/vqa_acc" in baseline["metrics"]
    assert not plain["curves"]["conflict_ratio"] and plain["step_s"] > 0, "the plain run only times steps"
    table = (out / "results.md").read_text()
    assert "| MoE baseline (λ=0, τ=0) (n=2) |" in table and "| dense (stage II) |" in table
    assert f"| MoE + STGC (λ={chosen}, τ=0) (n=2) |" in table
    for plot in ("conflicts_over_steps.png", "accuracy.png", "sweep.png"):
        assert (out / plot).stat().st_size > 0
