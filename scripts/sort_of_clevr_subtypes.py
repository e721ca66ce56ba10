"""Accuracy per Sort-of-CLEVR question subtype, image and text-only, beside its majority answer's rate.

Subtypes: shape, left/right (horizontal), top/bottom (vertical), closest, furthest, count; which
questions the study's models answer above the answer prior, and which they do not.

    python scripts/sort_of_clevr_subtypes.py results/mix/dense.json results/mix/runs/baseline_seed*.json
"""

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from stgc.sort_of_clevr.prepare import QUESTION_TYPES, subtype_of


def kind_of(record_id: str) -> str:
    """'image <subtype>' or 'text <subtype>' of a Sort-of-CLEVR question record."""
    return f"{'text' if record_id.endswith('_text') else 'image'} {subtype_of(record_id)}"


def majority_rates(data: Path) -> dict[str, float]:
    """Per subtype: the share of its test questions that its most frequent answer answers."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for name in ("instruct_test.json", "instruct_text_test.json"):
        for record in json.loads((data / name).read_text()):
            answers[kind_of(record["id"])][record["conversations"][1]["value"]] += 1
    return {subtype: max(c.values()) / c.total() for subtype, c in answers.items()}


def subtype_accuracies(run: dict) -> dict[str, float]:
    """A run's (or the dense record's) accuracy per subtype, over its Sort-of-CLEVR questions."""
    correct: dict[str, list[bool]] = defaultdict(list)
    for key, bit, question_type in zip(run["questions"], run["correct"], run["types"], strict=True):
        if question_type in QUESTION_TYPES:  # easy-vqa's ids can repeat Sort-of-CLEVR's: the type tells
            correct[kind_of(key.split("#")[0])].append(bit == "1")
    return {subtype: sum(c) / len(c) for subtype, c in correct.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run JSONs of scripts/reproduce.py (mix pipeline)")
    parser.add_argument("--data", default="data/sort_of_clevr")
    args = parser.parse_args()
    majority = majority_rates(Path(args.data))
    runs = {Path(path).stem: json.loads(Path(path).read_text()) for path in args.runs}
    types = next(run["types"] for run in runs.values() if "types" in run)  # dense.json has none: same order
    columns = {name: subtype_accuracies({"types": types} | run) for name, run in runs.items()}
    print("| subtype | majority answer | " + " | ".join(columns) + " |")
    print("|" + " --- |" * (2 + len(columns)))
    for subtype in sorted(majority):
        cells = [f"{columns[name][subtype]:.3f}" for name in columns]
        print(f"| {subtype} | {majority[subtype]:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
