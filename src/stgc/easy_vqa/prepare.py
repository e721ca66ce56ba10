"""The bundled easy-VQA dataset (PyPI `easy_vqa`) in LLaVA format, with a small trained tokenizer.

Layout written by prepare(out_dir):
    images/{train,test}/<n>.png              copies of the 64x64 images
    pretrain_{train,test}.json               one caption record per image ("a blue rectangle")
    instruct_{train,test}.json               one single-question conversation per question, typed answer
    instruct_text_{train,test}.json          the questions about colour, text only: the caption stated first
    tokenizer/                               byte-level BPE, loadable with AutoTokenizer
    FORMAT                                   the layout version, so older layouts are rebuilt
"""

import shutil
import time
from collections import defaultdict
from pathlib import Path

import easy_vqa
import numpy as np
from PIL import Image

from stgc.constants import IMAGE_PLACEHOLDER
from stgc.data.preparation import is_built, seal, write_json

SPLITS = ("train", "test")
SHAPES = ("circle", "rectangle", "triangle")
PALETTE = {  # the exact fill colours easy-VQA draws its shapes with
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
FORMAT = "4"  # 1: a conversation per image; 2: a record per question; 3: + text-only file; 4: colour only
QUESTION_TYPES = ("yes/no", "color", "shape")  # the labels of the answers (question_type)


def question_type(answer: str) -> str:
    """The eval category of an answer, one of QUESTION_TYPES."""
    yes_no, color, shape = QUESTION_TYPES
    if answer in ("yes", "no"):
        return yes_no
    if answer in SHAPES:
        return shape
    if answer in PALETTE:
        return color
    raise ValueError(f"unknown easy-VQA answer {answer!r}")


def question_words(question: str) -> set[str]:
    """The words of an easy-VQA question ("is there a red shape?" -> {"is", "there", "a", "red", "shape"})."""
    return set(question.rstrip("?").split())


def resolve(facts: set[str], excluded: set[str], vocabulary: set[str]) -> str | None:
    """The one value of an attribute that the answers imply, None if they leave it open."""
    stated = facts & vocabulary
    if len(stated) > 1:
        raise ValueError(f"answers contradict each other: {sorted(stated)}")
    candidates = stated or vocabulary - excluded
    return next(iter(candidates)) if len(candidates) == 1 else None


def pixel_colour(path: Path) -> str:
    """The palette colour covering most pixels (the background is never an exact palette colour)."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))  # (H, W, 3)
    counts = {name: int((rgb == value).all(-1).sum()) for name, value in PALETTE.items()}
    return max(counts, key=counts.get)


def captions(
    questions: list[str], answers: list[str], image_ids: list[int], paths: dict[int, Path]
) -> dict[int, str]:
    """Caption per image from what its answers imply; colour falls back to pixels, shape to "shape"."""
    facts, excluded = defaultdict(set), defaultdict(set)
    vocabulary = set(SHAPES) | set(PALETTE)
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        words = question_words(question)
        if answer not in ("yes", "no"):  # "what color is the circle?" -> blue: circle and blue hold
            facts[image_id] |= (words | {answer}) & vocabulary
            continue
        holds = (answer == "yes") != bool(words & {"not", "no"})
        mentioned = words & vocabulary
        if holds:
            facts[image_id] |= mentioned
        elif len(mentioned) == 1:  # "is there a red shape?" -> no: not red
            excluded[image_id] |= mentioned
    out = {}
    for image_id, path in paths.items():
        colour = resolve(facts[image_id], excluded[image_id], set(PALETTE)) or pixel_colour(path)
        shape = resolve(facts[image_id], excluded[image_id], set(SHAPES)) or "shape"
        out[image_id] = f"a {colour} {shape}"
    return out


def shape_is_known(caption: str) -> bool:
    """Whether a caption from captions() names the shape ("a blue circle"), not "a blue shape"."""
    return not caption.endswith(" shape")


def asks_about_color(question: str, answer: str) -> bool:
    """Whether a question asks for a colour or names one ("is there a red shape?", "what is the red
    shape?"): the text warm-up's questions."""
    return question_type(answer) == "color" or bool(question_words(question) & set(PALETTE))


def split_records(split: str) -> tuple[list[dict], list[dict], list[dict]]:
    """Pretrain (caption), instruction and text-only records of one split.

    Each question is its own record, as VQA scores it (in one conversation per image, the earlier
    gold answers sit in the context of the later questions). The text-only records are the
    questions that ask for or name a colour, with the image's caption stated first ("the image shows
    a blue rectangle. is there a red shape?"); the easy-vqa pipeline trains on them before the image
    questions, so the LM learns to compare the asked colour with a stated one (docs/experiments.md,
    "Why yes/no needs the text warm-up").
    """
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = {i: Path(p) for i, p in getattr(easy_vqa, f"get_{split}_image_paths")().items()}
    if missing := set(image_ids) - set(paths):
        raise ValueError(f"easy-VQA {split}: questions refer to missing images {sorted(missing)[:5]}")
    caption = captions(questions, answers, image_ids, paths)
    qa = defaultdict(list)
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        qa[image_id].append((question, answer))
    pretrain, instruct, text = [], [], []
    for image_id in sorted(paths):
        record_id, image = f"{split}_{image_id}", f"{split}/{image_id}.png"
        pretrain.append(
            {
                "id": record_id,
                "image": image,
                "conversations": [
                    {"from": "human", "value": IMAGE_PLACEHOLDER},
                    {"from": "gpt", "value": caption[image_id]},
                ],
            }
        )
        for k, (question, answer) in enumerate(qa[image_id]):
            conversation = [
                {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"},
                {"from": "gpt", "value": answer, "type": question_type(answer)},
            ]
            instruct.append({"id": f"{record_id}_q{k}", "image": image, "conversations": conversation})
            if asks_about_color(question, answer):
                stated = {"from": "human", "value": f"the image shows {caption[image_id]}. {question}"}
                text.append({"id": f"{record_id}_q{k}_text", "conversations": [stated, conversation[1]]})
    return pretrain, instruct, text


def copy_images(split: str, images_dir: Path) -> int:
    """Copy a split's PNGs, skipping those already there with the right size; return the number copied."""
    target = images_dir / split
    target.mkdir(parents=True, exist_ok=True)
    copied = 0
    for image_id, src in getattr(easy_vqa, f"get_{split}_image_paths")().items():
        dst = target / f"{image_id}.png"
        if not dst.is_file() or dst.stat().st_size != Path(src).stat().st_size:
            shutil.copyfile(src, dst)
            copied += 1
    return copied


def prepare(out_dir: str | Path) -> Path:
    """Write easy-VQA in LLaVA format plus a tokenizer under out_dir, once: copied images are kept,
    the JSON files and tokenizer are rebuilt together unless all of them are present in this FORMAT."""
    start, out_dir = time.perf_counter(), Path(out_dir)
    images_dir = out_dir / "images"
    copied = sum(copy_images(split, images_dir) for split in SPLITS)
    kinds = ("pretrain", "instruct", "instruct_text")
    if is_built(out_dir, FORMAT, [out_dir / f"{kind}_{split}.json" for split in SPLITS for kind in kinds]):
        print(f"easy-VQA in {out_dir}: complete ({copied} images copied, {time.perf_counter() - start:.1f}s)")
        return out_dir

    records, summary = [], []
    for split in SPLITS:
        pretrain, instruct, text = split_records(split)
        write_json(out_dir / f"pretrain_{split}.json", pretrain)
        write_json(out_dir / f"instruct_{split}.json", instruct)
        write_json(out_dir / f"instruct_text_{split}.json", text)
        records += pretrain + instruct + text
        n_open = sum(not shape_is_known(r["conversations"][1]["value"]) for r in pretrain)
        summary.append(
            f"{split}: {len(pretrain)} images ({n_open} of unknown shape), {len(instruct)} questions, "
            f"{len(text)} text-only"
        )
    vocab_size = seal(out_dir, FORMAT, records)
    print(
        f"easy-VQA in {out_dir}: {'; '.join(summary)}; {copied} images copied; "
        f"tokenizer vocab {vocab_size} ({time.perf_counter() - start:.1f}s)"
    )
    return out_dir
