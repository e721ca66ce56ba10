"""The planted-conflict task and its ground truth (docs/planted.md defines both).

Every token has an input x ~ N(0, I_D) and a family f, shown to the model (and so to the router) as a
one-hot cue beside x. The last family is the planted one (share `planted_share`); the others share the
rest equally. The dense model is trained on the other families only, so the planted family arrives with
stage III, where the experts are still identical copies. Two constructions of the targets:

- "shift" (the benchmark's): label y = (argmax(L x) + s_f) mod C, cross-entropy. One random linear
  classifier L shared by all families, each family shifting the class by its own s_f. The shifts are
  distinct, so any two families want different labels for *every* input.
- "flip" (the positive control): regression target y = σ_f L x, mean squared error, σ_f = -1 for the
  planted family and +1 for the others; the label scored is argmax(y). A planted token's gradient
  opposes the base families' in expectation over any inputs: ⟨L x xᵀ, L⟩ = ‖L x‖² ≥ 0.

Either way an expert that serves two families that disagree is pulled two ways by every token of the
one it serves less.

Notation: D input dims, C classes, F families, B tokens, S = B·k assignments, E experts.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from stgc_experiments.planted.truth import GroundTruth, minority

INPUT_DIM = 16  # D
CLASSES = 8  # C: at least the largest number of families (each needs its own shift)
CONSTRUCTIONS = ("shift", "flip")


@dataclass(frozen=True)
class Cell:
    """One point of the regime map."""

    planted_share: float = 0.2
    experts: int = 8
    top_k: int = 2
    families: int = 4
    construction: str = "shift"

    def __post_init__(self) -> None:
        if self.construction not in CONSTRUCTIONS:
            raise ValueError(f"construction ({self.construction!r}) must be one of {CONSTRUCTIONS}")
        if not 0 < self.planted_share < 1:
            raise ValueError(f"planted_share ({self.planted_share}) must be in (0, 1)")
        if not 2 <= self.families <= CLASSES:
            raise ValueError(f"families ({self.families}) must be in [2, {CLASSES}]")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k ({self.top_k}) must be in [1, experts={self.experts}]")

    @property
    def name(self) -> str:
        name = f"share{self.planted_share:g}_e{self.experts}_k{self.top_k}_f{self.families}"
        return name if self.construction == "shift" else f"{self.construction}_{name}"


@dataclass
class Task:
    """The maps drawn for one seed: the shared classifier, each family's shift and share."""

    classifier: Tensor  # (C, D)
    shifts: Tensor  # (F,) distinct, in [0, C)
    shares: Tensor  # (F,) sums to 1; the last family is the planted one
    construction: str = "shift"

    @classmethod
    def draw(cls, cell: Cell, generator: torch.Generator) -> "Task":
        classifier = torch.randn(CLASSES, INPUT_DIM, generator=generator)
        shifts = torch.randperm(CLASSES, generator=generator)[: cell.families]
        base = (1 - cell.planted_share) / (cell.families - 1)
        shares = torch.tensor([base] * (cell.families - 1) + [cell.planted_share])
        return cls(classifier, shifts, shares, cell.construction)

    @property
    def families(self) -> int:
        return self.shifts.numel()

    @property
    def planted(self) -> int:
        return self.families - 1

    def targets(self, x: Tensor, family: Tensor) -> dict[str, Tensor]:
        """For inputs (B, D) and families (B,): the label "y" (B,), and for "flip" the regression
        "target" (B, C) whose argmax it is."""
        scores = x @ self.classifier.T  # (B, C)
        if self.construction == "shift":
            return {"y": (scores.argmax(-1) + self.shifts[family]) % CLASSES}
        sign = torch.where(family == self.planted, -1.0, 1.0)  # (B,)
        target = scores * sign[:, None]  # (B, C)
        return {"y": target.argmax(-1), "target": target}

    def sample(self, count: int, generator: torch.Generator, planted: bool = True) -> dict[str, Tensor]:
        """`count` tokens drawn from the families' shares (without the planted family: the dense stage's
        data), as {"x": (B, D), "family": (B,), "id": (B,)} and `targets`."""
        shares = self.shares.clone()
        if not planted:
            shares[self.planted] = 0
        family = torch.multinomial(shares, count, replacement=True, generator=generator)  # (B,)
        x = torch.randn(count, INPUT_DIM, generator=generator)  # (B, D)
        return {"x": x, "family": family, "id": torch.arange(count), **self.targets(x, family)}


def side_of(family: Tensor, cell: Cell) -> tuple[Tensor, int]:
    """Each token's side and the number of sides. A side is a set of families that agree: for "shift"
    each family is its own (every family's label differs from every other's on every input), for "flip"
    the base families are one side and the planted family the other."""
    if cell.construction == "flip":
        return (family == cell.families - 1).long(), 2
    return family, cell.families


def planted_conflicts(family: Tensor, expert: Tensor, valid: Tensor, cell: Cell) -> Tensor:
    """(S,) bool: the ground truth. An assignment (t, e) with a gradient is planted-conflicting when t's
    side (side_of) is not the majority side of the assignments with a gradient on e in this micro-batch
    (ties: the lowest index). So the flagged-by-truth tokens are exactly those whose targets oppose what
    most of e's tokens ask of it.

    family, expert, valid: (S,) per assignment: the token's family, its expert, whether it has a gradient."""
    side, sides = side_of(family, cell)
    return minority(side, expert, valid, cell.experts, sides)


class CellTruth(GroundTruth):
    """The minimal level's ground truth (planted_conflicts) for the meter and the oracle."""

    def __init__(self, cell: Cell) -> None:
        self.cell = cell
        self.num_sides = side_of(torch.zeros(0, dtype=torch.long), cell)[1]

    def sides(self, batch: dict[str, Tensor]) -> Tensor:
        return side_of(batch["family"].reshape(-1), self.cell)[0]

    def token_ids(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["id"].reshape(-1)
