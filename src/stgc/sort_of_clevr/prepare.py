"""Sort-of-CLEVR (Santoro et al. 2017), generated here from a seed, in LLaVA format, with a tokenizer.

A scene is 6 objects of 6 distinct colours on a white 75x75 image, each a square or a circle. Each
question is its own record, typed by family for the VQA metric:
    non_relational   the shape of the <colour> object; is it on the left or right; top or bottom
    relational       the shape of the object closest to / furthest from the <colour> object
    count            how many objects have the same shape as the <colour> object (itself included)
    text_only        questions of the same scenes, the scene stated in words instead of the image

Layout written by prepare(out_dir):
    images/{train,val,test}/<n>.png          the rendered scenes
    scenes_{split}.json                      each image's objects: colour, shape, centre (x, y)
    pretrain_{split}.json                    one caption per image ("red square top left, ...")
    instruct_{split}.json                    QUESTIONS_PER_SUBTYPE questions per subtype per image
    instruct_text_{split}.json               3 of them per image (one per family), text only
    tokenizer/                               byte-level BPE on these texts, loadable with AutoTokenizer
    FORMAT                                   the layout version, so older layouts are rebuilt
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from stgc.constants import IMAGE_PLACEHOLDER
from stgc.data.preparation import is_built, seal, write_json

FORMAT = "1"
SPLITS = {"train": 4000, "val": 500, "test": 1000}  # images per split
QUESTIONS_PER_SUBTYPE = 2  # colours asked per subtype per image: 6 subtypes -> 12 questions an image
IMAGE_SIZE = 75
HALF_SIZE = 5  # a square spans centre +- 5 pixels; a circle has radius 5 (Santoro et al.'s sizes)
BACKGROUND = (255, 255, 255)
PALETTE = {  # the six colours of Santoro et al.'s generator
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "orange": (255, 156, 0),
    "gray": (128, 128, 128),
    "yellow": (255, 255, 0),
}
SHAPES = ("square", "circle")
SUBTYPES = {  # subtype -> (family, question about the <colour> object)
    "shape": ("non_relational", "what is the shape of the {} object?"),
    "horizontal": ("non_relational", "is the {} object on the left or on the right?"),
    "vertical": ("non_relational", "is the {} object at the top or at the bottom?"),
    "closest": ("relational", "what is the shape of the object closest to the {} object?"),
    "furthest": ("relational", "what is the shape of the object furthest from the {} object?"),
    "count": ("count", "how many objects have the same shape as the {} object?"),
}
FAMILIES = ("non_relational", "relational", "count")
TEXT_FAMILY = "text_only"
QUESTION_TYPES = (*FAMILIES, TEXT_FAMILY)
KINDS = ("scenes", "pretrain", "instruct", "instruct_text")  # the JSON files of a split


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    x: int  # centre, pixels from the left
    y: int  # centre, pixels from the top


Scene = tuple[SceneObject, ...]  # in PALETTE order


def squared_distances(scene: Scene, index: int) -> list[int]:
    """Squared centre distance from scene[index] to every object (itself: 0)."""
    me = scene[index]
    return [(o.x - me.x) ** 2 + (o.y - me.y) ** 2 for o in scene]


def has_unique_extremes(scene: Scene) -> bool:
    """Whether every object has one closest and one furthest other object (no ties)."""
    for i in range(len(scene)):
        others = [d for j, d in enumerate(squared_distances(scene, i)) if j != i]
        if others.count(min(others)) > 1 or others.count(max(others)) > 1:
            return False
    return True


def sample_scene(rng: np.random.Generator) -> Scene:
    """Six objects, one per colour, with disjoint bounding boxes and no distance ties (resampled)."""
    while True:
        centres: list[tuple[int, int]] = []
        while len(centres) < len(PALETTE):
            x, y = (int(v) for v in rng.integers(HALF_SIZE, IMAGE_SIZE - HALF_SIZE, 2))
            if all(max(abs(x - cx), abs(y - cy)) > 2 * HALF_SIZE + 1 for cx, cy in centres):
                centres.append((x, y))
        shapes = rng.integers(0, len(SHAPES), len(PALETTE))
        scene = tuple(
            SceneObject(colour, SHAPES[s], x, y)
            for colour, s, (x, y) in zip(PALETTE, shapes, centres, strict=True)
        )
        if has_unique_extremes(scene):
            return scene


def render(scene: Scene) -> Image.Image:
    """The scene as a 75x75 RGB image: squares and circles filled in their colour, no anti-aliasing."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in scene:
        box = (o.x - HALF_SIZE, o.y - HALF_SIZE, o.x + HALF_SIZE, o.y + HALF_SIZE)  # inclusive
        (draw.rectangle if o.shape == "square" else draw.ellipse)(box, fill=PALETTE[o.colour])
    return image


def answer(scene: Scene, subtype: str, colour: str) -> str:
    """The answer to a subtype's question about the object of `colour`."""
    index = list(PALETTE).index(colour)
    me, distances = scene[index], squared_distances(scene, index)
    others = [j for j in range(len(scene)) if j != index]
    if subtype == "shape":
        return me.shape
    if subtype == "horizontal":
        return "left" if me.x < IMAGE_SIZE / 2 else "right"
    if subtype == "vertical":
        return "top" if me.y < IMAGE_SIZE / 2 else "bottom"
    if subtype == "closest":
        return scene[min(others, key=distances.__getitem__)].shape
    if subtype == "furthest":
        return scene[max(others, key=distances.__getitem__)].shape
    if subtype == "count":
        return str(sum(o.shape == me.shape for o in scene))
    raise ValueError(f"unknown Sort-of-CLEVR question subtype {subtype!r}")


def caption(scene: Scene) -> str:
    """Stage I caption: every object's colour, shape and quadrant, in PALETTE order."""
    return ", ".join(
        f"{o.colour} {o.shape} {answer(scene, 'vertical', o.colour)} {answer(scene, 'horizontal', o.colour)}"
        for o in scene
    )


def describe(scene: Scene, order: list[int]) -> str:
    """The scene in words for the text-only family: objects in `order`, centres as (x, y) pixels."""
    objects = ", ".join(f"{scene[i].colour} {scene[i].shape} at ({scene[i].x}, {scene[i].y})" for i in order)
    return f"a {IMAGE_SIZE}x{IMAGE_SIZE} image shows: {objects}."


def image_records(
    split: str, n: int, scene: Scene, rng: np.random.Generator
) -> tuple[dict, list[dict], list[dict]]:
    """Caption, image-question and text-only records of the n-th image of a split."""
    record_id, image = f"{split}_{n}", f"{split}/{n}.png"
    pretrain = {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": IMAGE_PLACEHOLDER},
            {"from": "gpt", "value": caption(scene)},
        ],
    }
    asked = []  # (subtype, colour)
    for subtype in SUBTYPES:
        colours = rng.choice(len(PALETTE), QUESTIONS_PER_SUBTYPE, replace=False)
        asked += [(subtype, list(PALETTE)[c]) for c in colours]
    instruct = []
    for k, (subtype, colour) in enumerate(asked):
        family, template = SUBTYPES[subtype]
        conversation = [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{template.format(colour)}"},
            {"from": "gpt", "value": answer(scene, subtype, colour), "type": family},
        ]
        instruct.append({"id": f"{record_id}_q{k}", "image": image, "conversations": conversation})
    text, stated = [], describe(scene, rng.permutation(len(scene)).tolist())
    for family in FAMILIES:  # one question of each family, drawn from those asked about the image
        k = int(rng.choice([k for k, (s, _) in enumerate(asked) if SUBTYPES[s][0] == family]))
        subtype, colour = asked[k]
        conversation = [
            {"from": "human", "value": f"{stated} {SUBTYPES[subtype][1].format(colour)}"},
            {"from": "gpt", "value": answer(scene, subtype, colour), "type": TEXT_FAMILY},
        ]
        text.append({"id": f"{record_id}_q{k}_text", "conversations": conversation})
    return pretrain, instruct, text


def subtype_of(record_id: str) -> str:
    """The subtype a question record asks, from its id ('<split>_<n>_q<k>', its text-only copy with
    '_text'): an image's k-th question asks subtype k // QUESTIONS_PER_SUBTYPE (image_records)."""
    k = int(record_id.split("_q")[1].removesuffix("_text"))
    return list(SUBTYPES)[k // QUESTIONS_PER_SUBTYPE]


def split_seed(seed: int, split: str) -> list[int]:
    """The RNG seed of one split, from its name: splits draw independent scenes."""
    return [seed, *split.encode()]


def write_split(split: str, n_images: int, seed: int, out_dir: Path) -> dict[str, list[dict]]:
    """Render a split's images; return its scenes and its pretrain, instruct and text-only records."""
    rng = np.random.default_rng(split_seed(seed, split))
    (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    files = {kind: [] for kind in KINDS}
    for n in range(n_images):
        scene = sample_scene(rng)
        render(scene).save(out_dir / "images" / split / f"{n}.png")
        pretrain, instruct, text = image_records(split, n, scene, rng)
        files["scenes"].append({"image": pretrain["image"], "objects": [asdict(o) for o in scene]})
        files["pretrain"].append(pretrain)
        files["instruct"] += instruct
        files["instruct_text"] += text
    return files


def prepare(out_dir: str | Path, seed: int = 0, splits: dict[str, int] = SPLITS) -> Path:
    """Generate Sort-of-CLEVR under out_dir, once: it is rebuilt unless all files are present in
    this FORMAT (the same seed and sizes always write the same bytes)."""
    start, out_dir = time.perf_counter(), Path(out_dir)
    stamp = f"{FORMAT} seed={seed} " + " ".join(f"{split}={n}" for split, n in splits.items())
    if is_built(out_dir, stamp, [out_dir / f"{kind}_{split}.json" for split in splits for kind in KINDS]):
        print(f"Sort-of-CLEVR in {out_dir}: complete ({time.perf_counter() - start:.1f}s)")
        return out_dir
    records, summary = [], []
    for split, n_images in splits.items():
        files = write_split(split, n_images, seed, out_dir)
        for kind, data in files.items():
            write_json(out_dir / f"{kind}_{split}.json", data)
        records += files["pretrain"] + files["instruct"] + files["instruct_text"]
        summary.append(
            f"{split}: {n_images} images, {len(files['instruct'])} questions, "
            f"{len(files['instruct_text'])} text-only"
        )
    vocab_size = seal(out_dir, stamp, records)
    print(
        f"Sort-of-CLEVR in {out_dir}: {'; '.join(summary)}; tokenizer vocab {vocab_size} "
        f"({time.perf_counter() - start:.1f}s)"
    )
    return out_dir
