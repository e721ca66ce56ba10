"""VQA accuracy: normalised exact match, overall and per question type, synced across processes."""

import re
import string
from collections.abc import Sequence

import torch
from torchmetrics import Metric

from stgc.constants import OTHER_QUESTION_TYPE

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (VQA-style normalisation)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def metric_name(question_type: str) -> str:
    """The key of a question type's accuracy in compute() and the logs ("yes/no" -> "yes_no")."""
    return question_type.replace("/", "_")


class VQAAccuracy(Metric):
    """Fraction of exactly matching normalised answers; `compute()` gives overall and per-type values.

    `question_types` are the dataset's answer labels (its DataModule's `question_types`); an answer
    of any other label counts under "other".
    """

    full_state_update = False

    def __init__(self, question_types: Sequence[str] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.question_types = tuple(dict.fromkeys([*question_types, OTHER_QUESTION_TYPE]))
        self.add_state("correct", default=torch.zeros(len(self.question_types)), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(len(self.question_types)), dist_reduce_fx="sum")

    def update(self, predictions: list[str], targets: list[str], question_types: list[str]) -> None:
        if not len(predictions) == len(targets) == len(question_types):
            raise ValueError(
                f"got {len(predictions)} predictions, {len(targets)} targets, {len(question_types)} types"
            )
        known = self.question_types
        for prediction, target, question_type in zip(predictions, targets, question_types, strict=True):
            index = known.index(question_type if question_type in known else OTHER_QUESTION_TYPE)
            self.total[index] += 1
            self.correct[index] += float(normalize_answer(prediction) == normalize_answer(target))

    def compute(self) -> dict[str, torch.Tensor]:
        """{"overall": acc, "yes_no": acc, "color": acc, ...} (keys by metric_name); a type never
        seen is left out, and nothing is returned when no answer was scored."""
        if self.total.sum() == 0:
            return {}
        result = {"overall": self.correct.sum() / self.total.sum()}
        for index, question_type in enumerate(self.question_types):
            if self.total[index] > 0:
                result[metric_name(question_type)] = self.correct[index] / self.total[index]
        return result
