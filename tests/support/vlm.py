"""What the tests of stgc.vlm share: a DataModule attached to a tiny VLM module, and `stgc fit` of a tiny
configs/vlm/*_tiny.yaml on a slice of easy-vqa with its processor written for the run."""

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stgc.data import InstructionDataModule
from stgc_experiments.tiny_vlm import save_processor

# a fit's budget: 3 steps, τ = 0 (where a tiny random model has conflicts)
FIT_STEPS = ("--trainer.max_steps=3", "--trainer.limit_train_batches=3", "--trainer.callbacks.threshold=0.0")


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
