"""Load time and peak memory of a LLaVA-mix665k-sized instruction file, each in a fresh process.

    python scripts/bench_records.py --out /tmp/mix665k      # writes the data once (~1 min), then measures

The generated file has 665,298 records (~0.6 GB, as llava_v1_5_mix665k.json): 6% text-only
(ShareGPT-like, long multi-turn, a fifth of them with some non-ASCII text), the rest about images in five source
folders (coco, gqa, ocr_vqa, textvqa, vg), multi-turn VQA and long conversations, `<image>` at the
start or at the end of the first human turn. Image records take their image's stem as id, so the
records of one image repeat an id, as the real file does. The 380,000 distinct image paths are
hard links to 1,000 real 64x64 JPEG files (one inode each, so the folder stays small while every
path is a file of its own to check). Measured per fresh process: `load_records` alone, and the
InstructionDataModule's setup("fit") (load, val split by image, datasets, lengths for
group_by_length); peak RSS includes the ~0.4 GB of imports, which is printed separately.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

N_RECORDS = 665_298
TEXT_ONLY_SHARE = 0.061  # mix665k: 40,688 ShareGPT conversations
FOLDERS = ("coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K")
WORDS = (
    "the a of in on with is are what where which color shape left right man woman table red blue green "
    "sign street car bus dog cat person people holding standing sitting near behind front small large "
    "image picture shows there two three building window water sky tree grass white black yellow"
).split()
NON_ASCII = "café naïve — “quoted” 東京 😀".split()  # in some text-only conversations, as in ShareGPT's
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


def rss_mib() -> float:
    """Peak resident memory of this process so far, MiB: VmHWM, which (unlike ru_maxrss) does not
    carry the parent's peak over the exec."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def words(rng: random.Random, low: int, high: int, vocabulary: list[str] = WORDS) -> str:
    return " ".join(rng.choices(vocabulary, k=rng.randint(low, high)))


def conversation(rng: random.Random, image: bool) -> list[dict]:
    """Alternating human/gpt turns: short-answer VQA, a chat with long answers, or a detailed description."""
    kind = rng.choices(("vqa", "chat", "detail"), weights=(6, 3, 1))[0] if image else "chat"
    vocabulary = WORDS if image or rng.random() < 0.8 else WORDS + NON_ASCII
    pairs = {"vqa": rng.randint(2, 8), "chat": rng.randint(1, 5), "detail": 1}[kind]
    turns = []
    for i in range(pairs):
        question = words(rng, 4, 12) + "?" + (SHORT_ANSWER if kind == "vqa" else "")
        if i == 0 and image:
            question = f"<image>\n{question}" if rng.random() < 0.7 else f"{question}\n<image>"
        answer_words = {"vqa": (1, 3), "chat": (10, 60), "detail": (60, 120)}[kind]
        answer = words(rng, *answer_words, vocabulary)
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def write_images(folder: Path, n_files: int, n_paths: int) -> list[str]:
    """n_files real JPEGs, and n_paths relative paths across FOLDERS hard-linked to them."""
    from PIL import Image

    originals = folder / "originals"
    originals.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    files = []
    for i in range(n_files):
        path = originals / f"{i}.jpg"
        Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3))).save(path)
        files.append(path)
    paths = []
    for i in range(n_paths):
        relative = f"{FOLDERS[i % len(FOLDERS)]}/{i:012d}.jpg"
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():  # kept from an earlier run
            os.link(files[i % n_files], target)
        paths.append(relative)
    return paths


def generate(out: Path, n_records: int, n_image_files: int, n_image_paths: int) -> Path:
    """Write out/images and out/instruct.json unless they are there already; return the JSON path."""
    json_path = out / "instruct.json"
    if json_path.is_file():
        return json_path
    start = time.perf_counter()
    image_paths = write_images(out / "images", n_image_files, n_image_paths)
    rng = random.Random(0)
    records = []
    for i in range(n_records):
        if rng.random() < TEXT_ONLY_SHARE:
            records.append({"id": f"sharegpt_{i:x}_{i % 3}", "conversations": conversation(rng, image=False)})
        else:
            image = image_paths[rng.randrange(len(image_paths))]  # ~1.6 records per image, same id
            records.append(
                {"id": Path(image).stem, "image": image, "conversations": conversation(rng, image=True)}
            )
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(records, f)  # ensure_ascii, as Python writers leave it: non-ASCII text as \u escapes
    print(
        f"wrote {json_path} ({json_path.stat().st_size / 1e9:.2f} GB, {n_records} records) and "
        f"{n_image_paths} image paths over {n_image_files} files in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    return json_path


def measure(what: str, json_path: Path, image_folder: Path) -> dict:
    """Time and peak RSS of one load in this (fresh) process."""
    from stgc.data import InstructionDataModule, load_records

    imported = rss_mib()
    start = time.perf_counter()
    if what == "load":
        records, skipped = load_records(json_path, image_folder)
        result = {"records": len(records), "skipped": dict(skipped)}
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(json_path.parent / "tokenizer")
        data = InstructionDataModule(
            train_json=str(json_path), image_folder=str(image_folder), val_fraction=0.01, group_by_length=True
        )
        data.attach(tokenizer, lambda image: image, lambda image: image, num_image_tokens=576)
        data.setup("fit")
        lengths = data.datasets["train"].lengths  # what group_by_length's sampler reads
        result = {split: len(dataset) for split, dataset in data.datasets.items()} | {"lengths": len(lengths)}
    seconds = time.perf_counter() - start
    return {
        "what": what,
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(rss_mib()),
        "imports_rss_mib": round(imported),
        **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the generated data (reused)")
    parser.add_argument("--records", type=int, default=N_RECORDS)
    parser.add_argument("--image-files", type=int, default=1_000)
    parser.add_argument("--image-paths", type=int, default=380_000)
    parser.add_argument("--what", nargs="+", choices=["load", "datamodule"], default=["load", "datamodule"])
    parser.add_argument("--measure", choices=["load", "datamodule"], help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    json_path = args.out / "instruct.json"
    if args.measure:
        print(json.dumps(measure(args.measure, json_path, args.out / "images")))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    generate(args.out, args.records, args.image_files, args.image_paths)
    if "datamodule" in args.what and not (args.out / "tokenizer").is_dir():
        from stgc.data.preparation import train_tokenizer

        train_tokenizer([" ".join(WORDS)] * 10, args.out / "tokenizer")
    for what in args.what:
        child = [sys.executable, __file__, "--out", str(args.out), "--measure", what]
        result = subprocess.run(child, capture_output=True, text=True, check=False)
        if result.returncode:
            sys.exit(f"{what}: the measuring process failed:\n{result.stderr[-3000:]}")
        print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
