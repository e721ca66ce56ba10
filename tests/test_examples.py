"""The README's "Plug STGC into your own Lightning model" example runs as written."""

import runpy
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "olmoe_with_stgc.py"


def test_olmoe_example_trains_and_reports_conflict_statistics() -> None:
    stats = runpy.run_path(str(EXAMPLE))["main"]()
    assert {"stgc/conflict_ratio/all", "stgc/cosine_mean/all", "stgc/cel_loss/all"} <= set(stats)
    assert 0.0 <= stats["stgc/conflict_ratio/all"] <= 1.0
    assert -1.0 <= stats["stgc/cosine_mean/all"] <= 1.0
