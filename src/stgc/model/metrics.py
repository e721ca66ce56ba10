"""VQA accuracy: normalised exact match, overall and per question type, synced across processes."""

import re
import string

import torch
from torchmetrics import Metric

QUESTION_TYPES = ("yes/no", "color", "shape", "other")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (VQA-style normalisation)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


class VQAAccuracy(Metric):
    """Fraction of exactly matching normalised answers; `compute()` gives overall and per-type values."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.zeros(len(QUESTION_TYPES)), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(len(QUESTION_TYPES)), dist_reduce_fx="sum")

    def update(self, predictions: list[str], targets: list[str], question_types: list[str]) -> None:
        if not len(predictions) == len(targets) == len(question_types):
            raise ValueError(
                f"got {len(predictions)} predictions, {len(targets)} targets, {len(question_types)} types"
            )
        for prediction, target, question_type in zip(predictions, targets, question_types, strict=True):
            index = QUESTION_TYPES.index(question_type if question_type in QUESTION_TYPES else "other")
            self.total[index] += 1
            self.correct[index] += float(normalize_answer(prediction) == normalize_answer(target))

    def compute(self) -> dict[str, torch.Tensor]:
        """{"overall": acc, "yes_no": acc, "color": acc, ...}; a type never seen is left out, and
        nothing is returned when no answer was scored."""
        if self.total.sum() == 0:
            return {}
        result = {"overall": self.correct.sum() / self.total.sum()}
        for index, question_type in enumerate(QUESTION_TYPES):
            if self.total[index] > 0:
                result[question_type.replace("/", "_")] = self.correct[index] / self.total[index]
        return result
