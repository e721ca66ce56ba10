"""What the STGC study computes from its runs: per-question correctness, accuracy per question
family, paired bootstrap confidence intervals of an arm's difference to the baseline, and how the
experts share the work between the question families."""

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import move_data_to_device

from stgc.data.collate import answer_spans, is_empty
from stgc.model.metrics import metric_name, normalize_answer
from stgc.moe import moe_layers, short_layer_name
from stgc.moe.layer import expert_counts


def answers_correct(path: str | Path) -> dict[str, list]:
    """An answers file (stgc predict's JSON lines) as {"key": [...], "type": [...], "correct": [...]}:
    per answer its (id, occurrence, turn) key, question type and whether it matches the reference
    (VQAAccuracy's normalised exact match); answers without a reference are left out."""
    keys, types, correct = [], [], []
    with open(path, encoding="utf-8") as f:
        for row in map(json.loads, f):
            if row["reference"] is None:
                continue
            keys.append(f"{row['id']}#{row['occurrence']}#{row['turn']}")
            types.append(row["question_type"])
            correct.append(normalize_answer(row["prediction"]) == normalize_answer(row["reference"]))
    return {"key": keys, "type": types, "correct": correct}


def accuracies(scored: dict[str, list]) -> dict[str, float]:
    """Overall accuracy and per question type (keys as the logs name them: "overall", "yes_no", ...)."""
    correct, types = np.asarray(scored["correct"], dtype=float), np.asarray(scored["type"])
    result = {"overall": float(correct.mean())}
    for question_type in dict.fromkeys(scored["type"]):
        result[metric_name(question_type)] = float(correct[types == question_type].mean())
    return result


def paired_bootstrap(
    baseline: Sequence[Sequence[bool]],
    arm: Sequence[Sequence[bool]],
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """The arm's accuracy minus the baseline's, averaged over seeds (the i-th of each is one seed's
    per-question correctness, on the same questions in the same order), with a 95% percentile
    interval from resampling the questions with replacement (the same questions for every seed)."""
    base, other = np.asarray(baseline, dtype=float), np.asarray(arm, dtype=float)  # (seeds, questions)
    if base.shape != other.shape:
        raise ValueError(f"paired runs need the same seeds and questions: {base.shape} vs {other.shape}")
    if base.size == 0:
        raise ValueError("paired_bootstrap needs at least one seed and one question of each")
    difference = (other - base).mean(axis=0)  # (questions,) per question, averaged over the seeds
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, difference.size, size=(resamples, difference.size))
    means = difference[draws].mean(axis=1)  # (resamples,)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"difference": float(difference.mean()), "low": float(low), "high": float(high)}


@torch.no_grad()
def expert_load_by_family(
    module: LightningModule, batches: Iterable[dict[str, Any]]
) -> dict[str, dict[str, list]]:
    """Per MoE layer and question type: the share of the top-k slots each expert takes among the
    tokens that produce that type's answers (the positions whose next-token targets are an answer's
    tokens and end token), over `batches` (collated with their answers' types, as the val and test
    loaders give them) through `module(batch)`, the LVLM forward that records each layer's routing."""
    counts: dict[str, dict[str, torch.Tensor]] = {}  # layer -> type -> (E,) slots per expert
    module.eval()
    for batch in batches:
        if is_empty(batch):
            continue
        batch = move_data_to_device(batch, module.device)
        module(batch)
        type_index: dict[str, int] = {}
        family = torch.full_like(batch["labels"], -1)  # (B, L) type index of the answer a position produces
        for row, sample_types in enumerate(batch["question_types"]):
            spans = answer_spans(
                batch["labels"][row, 1:]
            )  # a span past the types: an answer cut by max_length
            for span, question_type in zip(spans, sample_types, strict=False):
                family[row, span] = type_index.setdefault(metric_name(question_type), len(type_index))
        for name, layer in moe_layers(module.model).items():
            record = layer.last_routing  # routed tokens only: token_index maps them into the B*L positions
            routed_family = family.reshape(-1)[record.token_index]  # (N,)
            num_experts = record.router_logits.shape[-1]
            per_type = counts.setdefault(short_layer_name(name), {})
            for question_type, index in type_index.items():
                selected = (routed_family == index)[:, None].expand_as(record.topk_index).float()  # (N, k)
                slots = expert_counts(record.topk_index, num_experts, selected).cpu()  # (E,)
                per_type[question_type] = per_type.get(question_type, 0) + slots
    return {
        layer: {t: (c / c.sum().clamp(min=1)).tolist() for t, c in sorted(per_type.items())}
        for layer, per_type in counts.items()
    }
