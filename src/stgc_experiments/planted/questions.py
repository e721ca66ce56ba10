"""The planted-conflict benchmark's pipeline level (docs/planted.md): the real LVLM's stage III on easy-vqa
with one planted instruction family, trained through `stgc fit`.

The planted family asks a yes/no question about an image with the cue word "opposite:" first, and its
answer is the flipped one ("opposite: is there a circle?" -> "no" where there is a circle): for the same
image and question it contradicts the base family. Base yes/no records keep their answers. The study's
stage II model has never seen the planted family, so it arrives with stage III, when the experts are
still identical copies: the case that tests the premise.

The ground truth (QuestionTruth) speaks of one token per yes/no record: its decision position, whose
next-token target is the answer's first token. Its side is base (0) or planted (1); every other token
is unlabelled.
"""

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from stgc.constants import IGNORE_INDEX
from stgc.method import Settings
from stgc_experiments import ROOT
from stgc_experiments.pipeline import stgc_at_root
from stgc_experiments.planted.run import Arm
from stgc_experiments.planted.truth import GroundTruth
from stgc_experiments.reproduce import sampled_loads
from stgc_experiments.study import accuracies, answers_correct, family_split

CUE = "opposite:"
PLANTED = "planted"  # the planted family's question type, and its records' id prefix
YES_NO = "yes/no"
BASE_PREFIX = "yes_no/"  # the base yes/no records' id prefix: the ground truth reads a record's side from it
FLIP = {"yes": "no", "no": "yes"}
SOURCE = ROOT / "data" / "easy_vqa"
CONFIGS = ("trainer.yaml", "easy_vqa/model.yaml", "easy_vqa/stage3_moe.yaml", "planted/stage3.yaml")


@dataclass(frozen=True)
class Questions:
    """The pipeline level's one cell: the planted family's share of the yes/no records and the budget."""

    planted_share: float = 0.2
    base_train: int = 12000  # easy-vqa train records drawn per seed (the planted copies come on top)
    base_test: int = 2000
    epochs: int = 1

    @property
    def name(self) -> str:
        return f"easy_vqa_share{self.planted_share:g}"


def planted_copy(record: dict[str, Any]) -> dict[str, Any]:
    """The planted family's version of a base yes/no record: the cue before the question, the answer flipped."""
    human, gpt = record["conversations"]
    image, question = human["value"].split("\n", 1)
    return {
        "id": f"{PLANTED}/{record['id']}",
        "image": record["image"],
        "conversations": [
            {"from": "human", "value": f"{image}\n{CUE} {question}"},
            {"from": "gpt", "value": FLIP[gpt["value"]], "type": PLANTED},
        ],
    }


def planted_split(records: list[dict], count: int, share: float, rng: random.Random) -> list[dict]:
    """`count` records drawn from `records`, the yes/no ones marked base, and planted copies of as many of
    those as make the planted family `share` of the yes/no records."""
    drawn = rng.sample(records, count)
    yes_no = [r for r in drawn if r["conversations"][1]["type"] == YES_NO]
    copies = [planted_copy(r) for r in rng.sample(yes_no, round(share / (1 - share) * len(yes_no)))]
    base = {id(r) for r in yes_no}
    marked = [{**r, "id": BASE_PREFIX + r["id"]} if id(r) in base else r for r in drawn]
    return marked + copies


def write_data(folder: Path, seed: int, cell: Questions) -> dict[str, Path]:
    """The seed's train and test files (LLaVA JSON, images in data/easy_vqa/images), written once."""
    paths = {split: folder / f"{split}.json" for split in ("train", "test")}
    if all(path.is_file() for path in paths.values()):
        return paths
    if not (SOURCE / "instruct_train.json").is_file():
        from stgc.easy_vqa.prepare import prepare

        prepare(SOURCE)
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", cell.base_train), ("test", cell.base_test)):
        records = json.loads((SOURCE / f"instruct_{split}.json").read_text())
        paths[split].write_text(json.dumps(planted_split(records, count, cell.planted_share, rng)))
    return paths


class QuestionTruth(GroundTruth):
    """Sides of the decision positions of yes/no records: base 0, planted 1 (from the record's id)."""

    num_sides = 2

    def sides(self, batch: dict[str, Any]) -> Tensor:
        labels = batch["labels"]  # (B, L), aligned with input_ids: position p predicts labels[p + 1]
        trained = labels != IGNORE_INDEX
        decision = trained.long().argmax(dim=1) - 1  # (B,) the position before the first trained target
        side = torch.full_like(labels, -1)
        for row, (record_id, _) in enumerate(batch["keys"]):
            family = (
                1 if record_id.startswith(PLANTED + "/") else 0 if record_id.startswith(BASE_PREFIX) else -1
            )
            if family >= 0 and trained[row].any():
                side[row, decision[row]] = family
        return side.reshape(-1)

    def token_ids(self, batch: dict[str, Any]) -> Tensor:
        """The record's index in the dataset: one labelled token per record."""
        indices = torch.tensor(batch["indices"], device=batch["labels"].device)  # (B,)
        return indices.repeat_interleave(batch["labels"].shape[1])


def callbacks(arm: Arm, meter_out: Path) -> dict[str, Any]:
    """The arm's callbacks as a config: last.ckpt, the meter, then STGC capturing at every step."""
    truth = {"class_path": f"{__name__}.QuestionTruth"}
    selection: Any = arm.selection
    if arm.selection == "oracle":
        selection = {
            "class_path": "stgc_experiments.planted.oracle.OracleSelection",
            "init_args": {"truth": truth},
        }
    stgc = {
        "threshold": Settings.threshold,
        "loss_weight": arm.loss_weight,
        "loss_type": arm.loss_type,
        "selection": selection,
        "histogram_every_n_steps": 1,  # both token gradients at every step: the meter compares all variants
    }
    return {
        "trainer": {
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"filename": "last", "enable_version_counter": False}},
                {"class_path": "stgc_experiments.planted.meter.PlantedMeter",
                 "init_args": {"truth": truth, "out": str(meter_out)}},
                {"class_path": "stgc.STGC", "init_args": stgc},
            ]
        }
    }  # fmt: skip


def run_args(arm: Arm, seed: int, cell: Questions, folder: Path, data: dict[str, Path]) -> list[str]:
    configs = [arg for name in CONFIGS for arg in ("-c", f"configs/{name}")]
    return [
        *configs,
        "-c",
        str(folder / "callbacks.yaml"),
        f"--trainer.default_root_dir={folder}",
        f"--trainer.max_epochs={cell.epochs}",
        f"--seed_everything={seed}",
        f"--data.init_args.order_seed={seed}",
        f"--data.init_args.train_json={data['train']}",
        f"--data.init_args.test_json={data['test']}",
    ]


def run_arm(arm: Arm, seed: int, cell: Questions, out: Path, log_root: Path, extra: list[str]) -> Path:
    """One arm's stage III for one seed through `stgc fit`, its test answers through `stgc predict`, and
    its JSON (out/runs/<cell>/<arm>/seed<N>.json, as the minimal level's); skipped when written."""
    path = out / "runs" / cell.name / arm.name / f"seed{seed}.json"
    if path.is_file():
        return path
    data = write_data(log_root / "data" / cell.name / f"seed{seed}", seed, cell)
    folder = log_root / cell.name / arm.name / f"seed{seed}"
    if folder.is_dir():  # an interrupted run
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "callbacks.yaml").write_text(yaml.safe_dump(callbacks(arm, folder / "meter.json")))
    args = [*run_args(arm, seed, cell, folder, data), *extra]
    start = time.perf_counter()
    fit = stgc_at_root(["fit", *args])
    wall_s = time.perf_counter() - start
    loads = sampled_loads(fit)  # per MoE layer and question type, on the test questions
    answers = folder / "test_answers.jsonl"
    stgc_at_root(
        ["predict", *args, f"--ckpt_path={folder / 'checkpoints' / 'last.ckpt'}", f"--answers.path={answers}"]
    )
    scored = answers_correct(answers)
    test = accuracies(scored)
    base = [c for c, t in zip(scored["correct"], scored["type"], strict=True) if t != PLANTED]
    record = {
        "cell": asdict(cell),
        "seed": seed,
        "arm": {"name": arm.name, **asdict(arm)},
        "threads": torch.get_num_threads(),
        "steps": fit.trainer.global_step,
        "seconds": round(wall_s, 1),
        "val_accuracy": float(fit.trainer.callback_metrics["val/vqa_acc"]),
        "val": {k: float(v) for k, v in fit.trainer.callback_metrics.items() if k.startswith("val/")},
        **json.loads((folder / "meter.json").read_text()),
        "accuracy": test["overall"],
        "accuracy_planted": test[PLANTED],
        "accuracy_base": sum(base) / len(base),
        "family_accuracy": test,
        "expert_load": loads,
        "planted_split": planted_vs_base(loads),
        "family_split": family_split(loads),
        "questions": scored["key"],
        "correct": "".join("1" if c else "0" for c in scored["correct"]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(record))
    partial.replace(path)
    return path


def planted_vs_base(loads: dict[str, dict[str, list]]) -> float:
    """How differently the experts serve the planted and the base yes/no family: the total variation
    distance between their expert loads, averaged over the MoE layers (0: the same mix; 1: disjoint)."""
    distances = [
        0.5 * sum(abs(a - b) for a, b in zip(per_type[PLANTED], per_type["yes_no"], strict=True))
        for per_type in loads.values()
    ]
    return sum(distances) / len(distances)
