"""What the tests of stgc.vlm share: a DataModule attached to a tiny VLM module, and `stgc fit` of a tiny
configs/vlm/*_tiny.yaml on a slice of easy-vqa with its processor written for the run."""

import json
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import ProcessorMixin

from stgc.data import InstructionDataModule
from stgc.vlm import TransformersVLMModule
from stgc_experiments.tiny_vlm import save_processor
from support.fit import ROOT

# a fit's budget: 3 steps, τ = 0 (where a tiny random model has conflicts)
FIT_STEPS = ("--trainer.max_steps=3", "--trainer.limit_train_batches=3", "--trainer.callbacks.threshold=0.0")


def vlm_records(
    folder: Path,
    records: list[dict],
    sizes: dict[str, tuple[int, int]],
    processor: Callable[[list[str]], ProcessorMixin],
    config: str,
) -> dict:
    """In `folder`: the records' JSON file, their images (`sizes`: name -> (width, height)), the processor
    built over their words and saved, and the module of `config`'s model with it (seeded)."""
    images = folder / "images"
    images.mkdir()
    for name, size in sizes.items():
        Image.new("RGB", size, (200, 30, 30)).save(images / name)
    (folder / "data.json").write_text(json.dumps(records))
    texts = [turn["value"] for record in records for turn in record["conversations"]]
    processor(texts).save_pretrained(folder / "processor")
    torch.manual_seed(0)
    module_args = yaml.safe_load((ROOT / config).read_text())["model"]["init_args"]
    module = TransformersVLMModule(**{**module_args, "processor": str(folder / "processor")})
    return {"json": folder / "data.json", "images": images, "module": module}


def datamodule(data: dict, **kwargs) -> InstructionDataModule:
    """An InstructionDataModule (template: chat) over `data`'s "json" and "images", attached to its
    "module", its fit splits built."""
    module = data["module"]
    datamodule = InstructionDataModule(
        train_json=str(data["json"]), val_json=str(data["json"]), image_folder=str(data["images"]),
        template="chat", question_types=("shape", "color", "yes_no"), **kwargs,
    )  # fmt: skip
    transform = module.image_transform(False)
    datamodule.attach(module.tokenizer, transform, transform, module.num_image_tokens, module.processor)
    datamodule.setup("fit")
    return datamodule


def tiny_vlm_args(family: str, config: str, easy_vqa_dir: Path, root: Path, records: int = 36) -> list[str]:
    """`stgc` arguments of a tiny VLM config on `records` easy-vqa records (one val batch), its processor
    written under `root`, its logs there too."""
    files = [easy_vqa_dir / "instruct_train.json", easy_vqa_dir / "instruct_test.json"]
    return [
        "-c", "configs/trainer.yaml", "-c", config,
        f"--model.init_args.processor={save_processor(family, files, root / 'processor')}",
        f"--data.init_args.train_json={files[0]}", f"--data.init_args.test_json={files[1]}",
        f"--data.init_args.image_folder={easy_vqa_dir / 'images'}",
        f"--data.init_args.limit_records={records}", "--data.init_args.val_fraction=0.2",
        "--trainer.limit_val_batches=1", f"--trainer.logger.init_args.save_dir={root}",
    ]  # fmt: skip


def logged_tags(folder: Path) -> set[str]:
    """The scalar tags of the TensorBoard events in `folder`."""
    return set(EventAccumulator(str(folder)).Reload().Tags()["scalars"])
