"""One seed of one cell: draw the task, train the dense model on the base families, then each arm's stage
III from the same upcycled weights with the real STGC callback under a Lightning Trainer."""

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from stgc import STGC
from stgc.method import Selection, Settings
from stgc_experiments.planted.meter import PlantedMeter
from stgc_experiments.planted.model import PlantedModel, PlantedModule, evaluate
from stgc_experiments.planted.oracle import OracleSelection
from stgc_experiments.planted.task import Cell, CellTruth, Task

ARM_SELECTIONS = ("gradient", "random", "oracle")


@dataclass(frozen=True)
class Arm:
    """One stage III setting: λ = 0 is the baseline (STGC measuring only)."""

    loss_type: str = "unlikelihood"
    loss_weight: float = 0.0
    selection: str = "gradient"

    @property
    def name(self) -> str:
        if self.loss_weight == 0:
            return "baseline"
        name = f"{self.loss_type}_lw{self.loss_weight:g}"
        return name if self.selection == "gradient" else f"{name}_{self.selection}"


@dataclass(frozen=True)
class Schedule:
    """How long and how big: tokens per split, steps per stage."""

    train_tokens: int = 16384
    eval_tokens: int = 8192
    batch_size: int = 256
    dense_steps: int = 1500
    moe_steps: int = 600
    lr: float = 3e-3


def draw_data(cell: Cell, seed: int, schedule: Schedule) -> tuple[Task, dict[str, dict[str, torch.Tensor]]]:
    """The seed's task and its splits: dense (base families only), train, val and test (all families)."""
    generator = torch.Generator().manual_seed(seed)
    task = Task.draw(cell, generator)
    splits = {
        "dense": task.sample(schedule.train_tokens, generator, planted=False),
        "train": task.sample(schedule.train_tokens, generator),
        "val": task.sample(schedule.eval_tokens, generator),
        "test": task.sample(schedule.eval_tokens, generator),
    }
    return task, splits


def fit(module: PlantedModule, steps: int, callbacks: list[L.Callback]) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
        callbacks=callbacks,
    )
    trainer.fit(module)


def selection_of(arm: Arm, cell: Cell) -> str | Selection:
    if arm.selection == "oracle":
        return OracleSelection(CellTruth(cell))
    return arm.selection


def train_arm(
    dense: PlantedModel, cell: Cell, seed: int, arm: Arm, splits: dict, schedule: Schedule
) -> dict[str, Any]:
    """Stage III of one arm from the dense model: upcycled, the experts and router trained, measured."""
    model = copy.deepcopy(dense)
    torch.manual_seed(seed)  # the same router initialisation and random draws for every arm of the seed
    model.upcycle(cell.experts, cell.top_k)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("mlp."))  # experts and router, as stage III
    stgc = STGC(
        threshold=Settings.threshold,
        loss_weight=arm.loss_weight,
        loss_type=arm.loss_type,
        selection=selection_of(arm, cell),
        histogram_every_n_steps=1,  # both token gradients at every step: the meter compares all variants
    )
    meter = PlantedMeter(CellTruth(cell), stgc)
    module = PlantedModule(model, splits["train"], seed, lr=schedule.lr, batch_size=schedule.batch_size)
    start = time.perf_counter()
    fit(module, schedule.moe_steps, [meter, stgc])  # the meter first: it reads the probes before STGC
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **meter.summary(), **scores(model, splits, cell)}


def scores(model: PlantedModel, splits: dict, cell: Cell) -> dict[str, Any]:
    """Test accuracy (overall, planted family, per family), val accuracy, experts' family purity."""
    test = splits["test"]
    result = evaluate(model, test)
    family, correct = test["family"], result["correct"]
    planted = family == cell.families - 1
    figures: dict[str, Any] = {
        "val_accuracy": float(evaluate(model, splits["val"])["correct"].float().mean()),
        "accuracy": float(correct.float().mean()),
        "accuracy_planted": float(correct[planted].float().mean()),
        "accuracy_base": float(correct[~planted].float().mean()),
        "family_accuracy": [float(correct[family == f].float().mean()) for f in range(cell.families)],
        "family_loss": [float(result["loss"][family == f].mean()) for f in range(cell.families)],
        "correct": "".join("1" if c else "0" for c in correct.tolist()),
    }
    if "experts" in result:
        loads = torch.zeros(cell.experts, cell.families)  # (E, F) test assignments
        experts = result["experts"]  # (B, k)
        loads.index_put_(
            (experts.reshape(-1), family.repeat_interleave(cell.top_k)), torch.ones(()), accumulate=True
        )
        figures["expert_family_load"] = (loads / loads.sum()).tolist()
        figures["purity"] = float(loads.max(dim=1).values.sum() / loads.sum())
    return figures


def run_seed(cell: Cell, seed: int, arms: list[Arm], schedule: Schedule, out: Path) -> list[Path]:
    """Every arm of one (cell, seed) not yet in `out` (resumable run by run); returns the JSON paths."""
    paths = {arm: out / "runs" / cell.name / arm.name / f"seed{seed}.json" for arm in arms}
    todo = [arm for arm in arms if not paths[arm].exists()]
    if todo:
        task, splits = draw_data(cell, seed, schedule)
        torch.manual_seed(seed)
        dense = PlantedModel(cell.families)
        start = time.perf_counter()
        fit(
            PlantedModule(dense, splits["dense"], seed, lr=schedule.lr, batch_size=schedule.batch_size),
            schedule.dense_steps,
            [],
        )
        dense_seconds = time.perf_counter() - start
        dense_scores = scores(dense, splits, cell)
        for arm in todo:
            figures = train_arm(dense, cell, seed, arm, splits, schedule)
            record = {
                "cell": asdict(cell),
                "seed": seed,
                "arm": {"name": arm.name, **asdict(arm)},
                "schedule": asdict(schedule),
                "threads": torch.get_num_threads(),
                "dense": {
                    "seconds": dense_seconds,
                    **{k: v for k, v in dense_scores.items() if k != "correct"},
                },
                **figures,
            }
            paths[arm].parent.mkdir(parents=True, exist_ok=True)
            partial = paths[arm].with_suffix(".json.tmp")
            partial.write_text(json.dumps(record, indent=1))
            partial.replace(paths[arm])  # a killed run leaves no half-written record
    return [paths[arm] for arm in arms]
