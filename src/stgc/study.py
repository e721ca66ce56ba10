"""What the STGC study computes from its runs' answers files: per-question correctness, accuracy per
question family, and paired bootstrap confidence intervals of an arm's difference to the baseline."""

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stgc.model.metrics import metric_name, normalize_answer


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
    difference = (other - base).mean(axis=0)  # (questions,) per question, averaged over the seeds
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, difference.size, size=(resamples, difference.size))
    means = difference[draws].mean(axis=1)  # (resamples,)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"difference": float(difference.mean()), "low": float(low), "high": float(high)}
