"""Where a checkpoint's easy-vqa yes/no answers go wrong: split by the asked attribute (shape or
colour), by whether the image has it, and by whether the question is negated.

    python scripts/vqa_errors.py logs/easy_vqa/stage2/checkpoints/last.ckpt --split test --limit 3000

The image's true colour and shape are read from its stage I caption ("a blue rectangle"); images
whose shape the data leave open ("a blue shape") are counted as unknown.
"""

import argparse
import os
from collections import Counter

import torch

from stgc.data import InstructionDataModule
from stgc.data.records import load_records
from stgc.easy_vqa.pipeline import stage_data_args
from stgc.easy_vqa.prepare import PALETTE, SHAPES, question_words
from stgc.module import LVLMModule

DATA = "data/easy_vqa"
STAGE2_DATA = stage_data_args("stage2")  # the prompt layout the checkpoint was trained on


def answers(module: LVLMModule, split: str, limit: int) -> list[tuple[str, str, str, str]]:
    """(image path, question, gold answer, generated answer) of the split's first `limit` answers."""
    data = InstructionDataModule(
        train_json=f"{DATA}/instruct_train.json",
        test_json=f"{DATA}/instruct_test.json",
        image_folder=f"{DATA}/images",
        system_prompt=STAGE2_DATA["system_prompt"],
        max_length=STAGE2_DATA["max_length"],
        eval_batch_size=100,
        skip_bad_records=False,  # rows are matched to answers by position: a skip would shift them
    )
    data.attach(
        module.tokenizer, module.image_transform(True), module.image_transform(False), module.num_image_tokens
    )
    data.setup("validate" if split == "val" else "test")
    loader = data.answer_loader(split)  # one sample per answer, in file order
    dataset = data.per_answer[split]
    rows = []
    for batch in loader:
        for generated in module.answer(batch):
            record_idx, turn = dataset.index[len(rows)]
            record = dataset.records[record_idx]
            rows.append(
                (str(record.image), record.turns[turn].question, record.turns[turn].answer, generated)
            )
        if len(rows) >= limit:
            break
    return rows[:limit]


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--limit", type=int, default=10**9, help="first N answers only")
    args = parser.parse_args()
    module = LVLMModule.load_from_checkpoint(args.checkpoint, map_location="cpu", init_from=None).eval()
    image_attributes = {}
    for file in ("train", "test"):
        for record in load_records(f"{DATA}/pretrain_{file}.json", f"{DATA}/images")[0]:
            image_attributes[str(record.image)] = set(record.turns[0].answer.split()[1:])
    with torch.no_grad():
        rows = answers(module, args.split, args.limit)
    total, right, said_yes = Counter(), Counter(), Counter()
    for image, question, gold, generated in rows:
        if gold not in ("yes", "no"):
            continue
        words = question_words(question.replace("<image>", ""))
        asked = words & (set(SHAPES) | set(PALETTE))
        kind = "shape" if asked & set(SHAPES) else "color"
        known = kind == "color" or "shape" not in image_attributes[image]
        present = ("yes" if asked & image_attributes[image] else "no") if known else "unknown"
        key = (kind, present, "negated" if words & {"not", "no"} else "plain")
        total[key] += 1
        right[key] += generated == gold
        said_yes[key] += generated == "yes"
    print(f"{len(rows)} {args.split} answers of {args.checkpoint}; yes/no questions by kind:")
    print("asked about | in image | question | n | accuracy | answered yes")
    for key in sorted(total):
        print(
            " | ".join(key),
            f"| {total[key]} | {right[key] / total[key]:.3f} | {said_yes[key] / total[key]:.3f}",
        )


if __name__ == "__main__":
    main()
