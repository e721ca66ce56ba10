"""The planted-conflict benchmark: its ground truth on hand-built batches, the task's construction, the
oracle's selection, the ROC-AUC against brute force, and a quick run of the script (files and fields
only, never the outcome)."""

import json
import subprocess
import sys

import torch

from stgc.method.probes import LayerConflicts, LayerRouting
from stgc.method.selection import SelectionStep
from stgc_experiments.planted.meter import BINS, roc_auc
from stgc_experiments.planted.oracle import OracleSelection
from stgc_experiments.planted.task import CLASSES, Cell, CellTruth, Task, planted_conflicts
from support.fit import ENV, ROOT
from support.planted import assert_arms_complete

# Eight assignments over three experts. Expert 0: families 0, 0, 1 (majority 0: the 1 is planted);
# expert 1: families 2, 3, 3, and a family-2 token without a gradient (majority 3: the 2 is planted);
# expert 2: one family-3 token (alone: the majority).
FAMILY = torch.tensor([0, 0, 1, 2, 3, 3, 2, 3])
EXPERT = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
VALID = torch.tensor([True, True, True, True, True, True, False, True])


def test_ground_truth_is_the_non_majority_family_of_each_expert() -> None:
    truth = planted_conflicts(FAMILY, EXPERT, VALID, Cell(experts=3, families=4))
    assert truth.tolist() == [False, False, True, True, False, False, False, False]


def test_flip_ground_truth_counts_base_families_as_one_side() -> None:
    """Expert 0 holds two base families (0 and 1): they agree, nothing is planted there. Expert 1 holds
    base family 2 once and the planted family 3 twice: the base token is the planted-conflicting one."""
    truth = planted_conflicts(FAMILY, EXPERT, VALID, Cell(experts=3, families=4, construction="flip"))
    assert truth.tolist() == [False, False, False, True, False, False, False, False]


def test_ties_go_to_the_lowest_family() -> None:
    family, expert, valid = torch.tensor([1, 0]), torch.tensor([0, 0]), torch.tensor([True, True])
    assert planted_conflicts(family, expert, valid, Cell(experts=1, top_k=1, families=2)).tolist() == [
        True,
        False,
    ]


def test_every_pair_of_families_disagrees_on_every_input() -> None:
    cell = Cell(families=CLASSES)
    task = Task.draw(cell, torch.Generator().manual_seed(0))
    x = torch.randn(500, task.classifier.shape[1])
    labels = torch.stack(
        [task.targets(x, torch.full((500,), f))["y"] for f in range(cell.families)]
    )  # (F, B)
    for f in range(cell.families):
        for g in range(f):
            assert (labels[f] != labels[g]).all()


def test_flip_targets_are_the_base_targets_negated() -> None:
    cell = Cell(families=3, construction="flip")
    task = Task.draw(cell, torch.Generator().manual_seed(0))
    data = task.sample(300, torch.Generator().manual_seed(1))
    base = data["x"] @ task.classifier.T  # (B, C)
    planted = data["family"] == 2
    assert planted.any() and (~planted).any()
    torch.testing.assert_close(data["target"][planted], -base[planted])
    torch.testing.assert_close(data["target"][~planted], base[~planted])
    assert torch.equal(data["y"], data["target"].argmax(-1))


def test_shares_and_the_dense_split_leave_out_the_planted_family() -> None:
    cell = Cell(planted_share=0.05, families=4)
    task = Task.draw(cell, torch.Generator().manual_seed(0))
    torch.testing.assert_close(task.shares, torch.tensor([0.95 / 3] * 3 + [0.05]))
    dense = task.sample(2000, torch.Generator().manual_seed(0), planted=False)
    assert not (dense["family"] == 3).any()


def test_token_ids_follow_rows_and_positions() -> None:
    truth = CellTruth(Cell())
    batch = {"id": torch.tensor([5, 6, 7, 8])}
    rows = torch.tensor([1, 0, 1])
    assert truth.ids(batch, rows, None).tolist() == [6, 5, 6]
    assert truth.ids(batch, rows, torch.tensor([3, 2])).tolist() == [7, 8, 7]


def test_oracle_applies_the_cel_to_planted_pairs_only_and_no_more_than_the_gradient_flags() -> None:
    conflicts = LayerConflicts(
        cosine=torch.zeros(8), rows=torch.arange(8), expert=EXPERT, has_grad=VALID, modality=None,
        finite=torch.tensor(True),
    )  # fmt: skip
    routing = LayerRouting(torch.zeros(8, 2), [torch.zeros(0, dtype=torch.long)] * 3, None, None)  # 3 experts
    oracle = OracleSelection(CellTruth(Cell(experts=3, families=4)))
    step = SelectionStep({"family": FAMILY}, [routing], seed=0)
    truth = torch.tensor([False, False, True, True, False, False, False, False])
    one = torch.tensor([True] + [False] * 7)
    for flagged, count in (
        (one, 1),
        (torch.ones(8, dtype=torch.bool), 2),
        (torch.zeros(8, dtype=torch.bool), 0),
    ):
        (chosen,) = oracle.select([conflicts], [flagged], step)
        assert int(chosen.sum()) == count and not (chosen & ~truth).any()


def test_roc_auc_of_the_histograms_matches_a_brute_force_count() -> None:
    torch.manual_seed(0)
    planted = torch.rand(300) * 2 - 1.2  # lower cosines, mostly
    other = torch.rand(700) * 2 - 0.9

    def histogram(values: torch.Tensor) -> torch.Tensor:
        bins = ((values.clamp(-1, 1) + 1) / 2 * BINS).long().clamp(max=BINS - 1)
        return torch.zeros(BINS, dtype=torch.float64).index_add_(
            0, bins, torch.ones_like(bins, dtype=torch.float64)
        )

    hist_planted, hist_other = histogram(planted), histogram(other)
    bin_of = lambda v: ((v.clamp(-1, 1) + 1) / 2 * BINS).long().clamp(max=BINS - 1)  # noqa: E731
    p, o = bin_of(planted)[:, None], bin_of(other)[None, :]
    brute = ((p < o).double() + 0.5 * (p == o).double()).mean()  # a planted pair below an other one
    assert abs(roc_auc(torch.stack([hist_other, hist_planted])) - float(brute)) < 1e-12
    assert roc_auc(torch.stack([hist_other, torch.zeros(BINS, dtype=torch.float64)])) is None


def test_quick_benchmark_writes_runs_summary_table_and_figures(tmp_path) -> None:
    out = tmp_path / "planted"
    done = subprocess.run(
        [sys.executable, "scripts/planted.py", "--quick", "--seeds", "2", "--parts", "screen", "cell", "control",
         "--families", "3", "--experts", "4", "--out", str(out)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| cell | setting | arm |" in done.stdout
    for name in ("screen.json", "summary.json", "results.md", "regime_map.png", "roc.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["cells"]) == {"share0.2_e4_k2_f3", "flip_share0.2_e4_k2_f3"}
    assert summary["settings"] == [summary["chosen"]]
    for cell in summary["cells"].values():
        assert_arms_complete(cell["settings"][summary["chosen"]], seeds=[0, 1])
    run = json.loads((out / "runs" / "share0.2_e4_k2_f3" / "baseline" / "seed0.json").read_text())
    assert run["threads"] == 1 and len(run["correct"]) == 512 and len(run["planted_rate_curve"]) == 12
    screen = json.loads((out / "screen.json").read_text())
    assert len(screen["settings"]) == 7 and screen["chosen"]["name"] in screen["settings"]
