"""What the STGC study computes from its runs: per-question correctness, accuracy per question
family, paired confidence intervals of an arm's difference to the baseline (seed-level), and how the
experts share the work between image and text tokens and between the question families."""

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import move_data_to_device
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stgc.data.collate import answer_spans, is_empty
from stgc.method import names as metric_names
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


def layer_curves(events: EventAccumulator, names: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    """Per name (a `stgc/<name>/<layer>` quantity), its value at each logged step averaged over the MoE
    layers, from a run's TensorBoard events."""
    tags = events.Tags()["scalars"]
    result = {}
    for name in names:
        by_step: dict[int, list[float]] = {}
        for tag in tags:
            if metric_names.layer_of(tag, name) is not None:
                for event in events.Scalars(tag):
                    by_step.setdefault(event.step, []).append(event.value)
        result[name] = [(step, float(np.mean(values))) for step, values in sorted(by_step.items())]
    return result


def modality_split(events: EventAccumulator) -> float:
    """How differently the experts serve image and text tokens at the end: the total variation
    distance between the two modalities' expert loads (0: the same mix of experts; 1: disjoint),
    from each MoE layer's last logged loads, averaged over the layers."""
    loads: dict[tuple[str, str], list[float]] = {}
    for tag in sorted(events.Tags()["scalars"]):
        parts = tag.split("/")  # moe/<layer>/load_<modality>/expert_<e>
        if len(parts) == 4 and parts[0] == "moe" and parts[2] in ("load_image", "load_text"):
            loads.setdefault((parts[1], parts[2]), []).append(events.Scalars(tag)[-1].value)
    layers = {layer for layer, _ in loads}
    distances = [
        0.5 * sum(abs(i - t) for i, t in zip(loads[(layer, "load_image")], loads[(layer, "load_text")], strict=True))
        for layer in sorted(layers)
    ]  # fmt: skip
    return statistics.fmean(distances) if distances else float("nan")


def late_mean(curve: Sequence[Sequence[float]], tail: float) -> float:
    """The mean of a curve's values over its last `tail` fraction of (step, value) points, at least one
    (0: the last point). Conflict ratios swing from batch to batch: the last step alone says little."""
    values = [value for _, value in curve]
    return float(np.mean(values[-max(1, round(tail * len(values))) :]))


def student_t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with `df` degrees of freedom: bisection on its CDF, the
    density integrated by Simpson's rule (no scipy in the pins)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 2001)
        density = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid**2 / df))
        weights = np.ones_like(grid)
        weights[1:-1:2], weights[2:-1:2] = 4, 2
        return 0.5 + float((weights * density).sum() * (x / 2000) / 3)

    low, high = 0.0, 1.0
    while cdf(high) < p:
        low, high = high, 2 * high
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < p else (low, middle)
    return (low + high) / 2


def paired_interval(
    baseline: Sequence[Sequence[bool]],
    arm: Sequence[Sequence[bool]],
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """The arm's accuracy minus the baseline's, averaged over seeds (the i-th of each is one seed's
    per-example correctness; seeds may have different examples), with a 95% interval that holds the
    seed-to-seed variance: Student's t over the per-seed differences (each already carries its
    examples' noise). With one seed there is no seed variance to see: a paired bootstrap over its
    examples. ("seeds" says how many seeds the interval rests on.)"""
    if len(baseline) != len(arm) or not baseline:
        raise ValueError(f"paired runs need the same seeds, at least one: {len(baseline)} vs {len(arm)}")
    differences = []  # per seed (examples,)
    for base, other in zip(baseline, arm, strict=True):
        base, other = np.asarray(base, dtype=float), np.asarray(other, dtype=float)
        if base.shape != other.shape or base.size == 0:
            raise ValueError(
                f"a seed's paired runs need the same examples, at least one: {base.shape} vs {other.shape}"
            )
        differences.append(other - base)
    per_seed = np.array([d.mean() for d in differences])  # (seeds,)
    mean = float(per_seed.mean())
    if len(per_seed) > 1:
        half = student_t_quantile(0.975, len(per_seed) - 1) * per_seed.std(ddof=1) / math.sqrt(len(per_seed))
        return {"mean": mean, "low": mean - half, "high": mean + half, "seeds": len(per_seed)}
    (difference,) = differences
    draws = np.random.default_rng(seed).integers(0, difference.size, size=(resamples, difference.size))
    low, high = np.percentile(difference[draws].mean(axis=1), [2.5, 97.5])
    return {"mean": mean, "low": float(low), "high": float(high), "seeds": 1}


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


def family_split(loads: dict[str, dict[str, list]]) -> float:
    """How differently the experts serve the question families: the total variation distance between
    two families' expert loads (expert_load_by_family's; 0: the same mix of experts; 1: disjoint),
    averaged over the pairs of families and the MoE layers."""
    distances = [
        0.5 * sum(abs(a - b) for a, b in zip(per_type[s], per_type[t], strict=True))
        for per_type in loads.values()
        for i, s in enumerate(per_type)
        for t in list(per_type)[i + 1 :]
    ]
    return statistics.fmean(distances) if distances else float("nan")
