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
    arms = sorted(r["run"]["arm"] for r in runs.values())
    assert arms == ["baseline", "baseline", "stgc", "stgc", "sweep"]
    baseline = next(r for r in runs.values() if r["run"]["arm"] == "baseline")
    assert baseline["curves"]["conflict_ratio"], "the baseline measures conflicts too"
    assert "test/vqa_acc" in baseline["metrics"] and "val/vqa_acc" in baseline["metrics"]
    table = (out / "results.md").read_text()
    assert (
        "| MoE baseline (n=2) |" in table
        and "| MoE + STGC (n=2) |" in table
        and "| dense (stage II) |" in table
    )
    for plot in ("conflicts_over_steps.png", "accuracy.png", "sweep.png"):
        assert (out / plot).stat().st_size > 0
