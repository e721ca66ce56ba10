"""LightningDataModules for LLaVA-format data: stage I (plain captions) and stages II/III (instructions)."""

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase, ProcessorMixin

from stgc.data.collate import LlavaCollator, pad_token_id
from stgc.data.dataset import ImageTransform, LlavaDataset
from stgc.data.processor import ProcessorTemplate
from stgc.data.records import Record, load_records
from stgc.data.sampler import EvalShardSampler, LengthGroupedSampler
from stgc.data.templates import ChatTemplate, InstructionTemplate, PlainTemplate, Template


def as_files(value: str | Sequence[str | None] | None) -> list[str | None] | None:
    """A file argument as a list: one file, or several (None stays None)."""
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


class LlavaDataModule(LightningDataModule):
    """Shared base: loads the JSON files, carves val from train if needed, builds datasets and loaders.

    The tokenizer, image transforms and num_image_tokens come from the LightningModule at setup
    (its `tokenizer`, `image_transform(train)`, `num_image_tokens`), or from attach() beforehand.
    Each split may come from several LLaVA JSON files (MoE-LLaVA's list of data files): file i of
    train_json, val_json and test_json is dataset i, its image paths relative to image_folder[i] (or
    to the one image_folder). Without val_json, or where its entry is None, val is carved from that
    dataset's train file (see split).
    `question_types` are the answer labels of the data (the "type" of its gpt turns): the model
    reports its VQA accuracy per type.
    """

    def __init__(
        self,
        train_json: str | list[str],
        image_folder: str | list[str],
        val_json: str | list[str | None] | None = None,
        test_json: str | list[str] | None = None,
        val_fraction: float = 0.05,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        max_length: int = 256,
        seed: int = 0,
        order_seed: int | None = None,
        skip_bad_records: bool = True,
        limit_records: int | None = None,
        group_by_length: bool = False,
        question_types: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        for name, value in [
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("max_length", max_length),
        ]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if limit_records is not None and limit_records < 1:
            raise ValueError(f"limit_records must be None or >= 1, got {limit_records}")
        self.save_hyperparameters(logger=False)
        self.files = {"train": as_files(train_json), "val": as_files(val_json), "test": as_files(test_json)}
        n_datasets = len(self.files["train"])
        if self.files["val"] is None:
            self.files["val"] = [None] * n_datasets
        self.image_folders = (
            [image_folder] * n_datasets if isinstance(image_folder, str) else list(image_folder)
        )
        for name, files in [
            ("image_folder", self.image_folders),
            *[(f"{k}_json", v) for k, v in self.files.items()],
        ]:
            if files is not None and len(files) != n_datasets:
                raise ValueError(
                    f"{name} lists {len(files)} entries for {n_datasets} train_json files: give one per dataset"
                )
        if None in self.files["train"] + (self.files["test"] or []):
            raise ValueError("train_json and test_json entries must be files; only val_json takes null")
        self.question_types = tuple(question_types)
        self.template: Template | None = None
        self.processor: ProcessorMixin | None = None  # a processor model's, given by attach()
        self.collator: LlavaCollator | None = None
        self.transforms: dict[str, ImageTransform] = {}
        self.datasets: dict[str, LlavaDataset] = {}
        self._picture_sample: dict[str, Any] | None = None  # built by conflict_picture_sample
        self.found_bad: dict[
            str, dict[tuple[str, int], str]
        ] = {}  # split -> {record key: reason}, in batches
        self.per_answer: dict[str, LlavaDataset] = {}  # split -> one sample per answer (predict)

    def make_template(self, tokenizer: PreTrainedTokenizerBase, num_image_tokens: int) -> Template:
        """The conversation template of this stage."""
        raise NotImplementedError

    def attach(
        self,
        tokenizer: PreTrainedTokenizerBase,
        train_transform: ImageTransform,
        eval_transform: ImageTransform,
        num_image_tokens: int,
        processor: ProcessorMixin | None = None,
    ) -> None:
        """Give the model-side inputs (for standalone use; setup() otherwise takes them from the model);
        `processor`: a transformers processor model's (its tokenizer is `tokenizer`), for its image tokens."""
        self.processor = processor
        self.template = self.make_template(tokenizer, num_image_tokens)
        if processor is not None and not isinstance(self.template, ProcessorTemplate):
            raise ValueError(
                f"{type(self).__name__} ({type(self.template).__name__}): a processor model's images are its "
                "own tokens, which only InstructionDataModule's template: chat places"
            )
        self.collator = LlavaCollator(pad_token_id(tokenizer))
        self.transforms = {"train": train_transform, "eval": eval_transform}

    def setup(self, stage: str) -> None:
        """Attach the model's tokenizer/transforms if needed, then build the datasets of `stage`."""
        if self.template is None:
            if self.trainer is None:
                raise RuntimeError(
                    f"{type(self).__name__} has no tokenizer: call attach() or use it with a Trainer"
                )
            model = self.trainer.lightning_module
            self.attach(
                model.tokenizer,
                model.image_transform(True),
                model.image_transform(False),
                model.num_image_tokens,
                getattr(model, "processor", None),
            )
        if stage in ("fit", "validate") and "train" not in self.datasets:
            train, val, skipped, val_skipped = [], [], Counter(), Counter()
            for train_json, val_json, folder in zip(
                self.files["train"], self.files["val"], self.image_folders, strict=True
            ):
                records, counts = self.load(train_json, folder)
                skipped += counts
                if val_json is None:
                    records, carved = self.split(records, train_json)
                    val += carved
                else:
                    carved, counts = self.load(val_json, folder)
                    val, val_skipped = val + carved, val_skipped + counts
                train += records
            self.datasets["train"] = self.dataset(train, skipped, answers="none")
            self.datasets["val"] = self.dataset(val, val_skipped, answers="all")
        if stage in ("test", "predict") and "test" not in self.datasets:
            if self.files["test"] is None:
                raise ValueError(
                    f"{type(self).__name__}.test_json is not set; pass the test file to test or predict"
                )
            test, skipped = [], Counter()
            for test_json, folder in zip(self.files["test"], self.image_folders, strict=True):
                records, counts = self.load(test_json, folder)
                test, skipped = test + records, skipped + counts
            self.datasets["test"] = self.dataset(test, skipped, answers="all")

    def load(self, json_path: str, image_folder: str) -> tuple[list[Record], Counter[str]]:
        """Valid records of one file and its skip counts."""
        h = self.hparams
        return load_records(json_path, image_folder, h.skip_bad_records, h.limit_records)

    def split(self, records: Sequence[Record], source: str) -> tuple[list[Record], list[Record]]:
        """Seeded train/val split by image: all records of one image (and so all answers of a
        conversation) stay on one side, so val images are unseen in training. Text-only records
        are split one by one."""
        groups: dict[Any, list[int]] = {}  # image path, or record position for a text-only record
        for i, r in enumerate(records):
            groups.setdefault(r.image if r.image is not None else i, []).append(i)
        keys = list(groups)
        n_val = max(1, round(self.hparams.val_fraction * len(keys)))
        if n_val >= len(keys):
            raise ValueError(
                f"{source}: {len(keys)} images (or text-only records) are too few to carve a val split"
            )
        order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(self.hparams.seed))
        val_idx = {i for k in order[:n_val].tolist() for i in groups[keys[k]]}
        return [r for i, r in enumerate(records) if i not in val_idx], [records[i] for i in sorted(val_idx)]

    def dataset(self, records: Sequence[Record], load_skipped: Counter[str], answers: str) -> LlavaDataset:
        """Dataset with this module's template, transform and limits (see LlavaDataset for `answers`)."""
        transform = self.transforms["train" if answers == "none" else "eval"]
        return LlavaDataset(
            records,
            self.template,
            transform,
            self.hparams.max_length,
            answers,
            self.hparams.skip_bad_records,
            load_skipped,
        )

    def conflict_picture_sample(self) -> dict[str, Any] | None:
        """The one-sample batch STGC's conflict picture shows at every histogram step
        (stgc.report.picture): the val split's first record with an image (skipping bad ones), encoded
        and collated as training batches are but with the eval transform (no random crop); built on the
        first call. None before `setup("fit")` or without such a record."""
        if self._picture_sample is None and "val" in self.datasets:
            records = [record for record in self.datasets["val"].records if record.image is not None]
            dataset = LlavaDataset(records, self.template, self.transforms["eval"], self.hparams.max_length)
            items = (dataset[i] for i in range(len(dataset)))  # a bad record gives a "skipped" item
            item = next((item for item in items if "skipped" not in item), None)
            self._picture_sample = None if item is None else self.collator([item])
        return self._picture_sample

    # -- bad records ------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Note the bad records a batch dropped (each record once, however often it is drawn)."""
        if batch["skipped"]:
            self.found_bad.setdefault(self._running_split(), {}).update(batch["skipped"])
        return batch

    def _running_split(self) -> str:
        """The split the trainer is drawing batches from now (test serves predict too)."""
        if self.trainer.training:
            return "train"
        if self.trainer.validating or self.trainer.sanity_checking:
            return "val"
        return "test"

    def skip_report(self) -> dict[str, Counter[str]]:
        """Bad records skipped so far per split, by reason: refused when the file was read, or found
        while loading samples (pixel data, length; counted once a batch has held them)."""
        report = {}
        for split, dataset in self.datasets.items():
            found = Counter(self.found_bad.get(split, {}).values())
            if counts := dataset.load_skipped + found:
                report[split] = counts
        return report

    def teardown(self, stage: str) -> None:
        """Report every skip of the run, once, at its end."""
        for split, counts in self.skip_report().items():
            rank_zero_info(
                f"{type(self).__name__}: {split}: skipped {counts.total()} bad records: {dict(counts)}"
            )

    def loader(self, dataset: LlavaDataset, **kwargs: Any) -> DataLoader:
        """DataLoader over one of the built datasets."""
        workers = self.hparams.num_workers
        on_gpu = self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)
        return DataLoader(
            dataset,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=on_gpu,  # page-locked batches: host-to-device copies that do not block
            collate_fn=self.collator,
            **kwargs,
        )

    @property
    def order_seed(self) -> int:
        """The training order's seed: `order_seed`, else `seed` (which also draws the val split), so a
        study can vary the order with its seed while every arm keeps the same split."""
        h = self.hparams
        return h.seed if h.order_seed is None else h.order_seed

    def train_dataloader(self) -> DataLoader:
        """Shuffled with a seeded generator, so runs are reproducible; with group_by_length each
        batch holds conversations of similar length (less padding)."""
        h = self.hparams
        if h.group_by_length:
            world_size, rank = self.world()
            lengths = self.datasets["train"].lengths
            sampler = LengthGroupedSampler(
                lengths, h.batch_size, self.order_seed, num_replicas=world_size, rank=rank
            )
            return self.loader(self.datasets["train"], batch_size=h.batch_size, sampler=sampler)
        generator = torch.Generator().manual_seed(self.order_seed)
        return self.loader(self.datasets["train"], batch_size=h.batch_size, shuffle=True, generator=generator)

    def eval_loader(self, split: str) -> DataLoader:
        """Whole conversations in file order, or shortest first with group_by_length (the metrics
        do not depend on the order); split across ranks without repeats under DDP."""
        order = range(len(self.datasets[split]))
        if self.hparams.group_by_length:
            lengths = self.datasets[split].lengths
            order = sorted(order, key=lengths.__getitem__)
        world_size, rank = self.world()
        if world_size > 1:  # each sample on exactly one rank, none repeated: the metrics stay exact
            order = EvalShardSampler(order, num_replicas=world_size, rank=rank)
        return self.loader(self.datasets[split], batch_size=self.hparams.eval_batch_size, sampler=order)

    def world(self) -> tuple[int, int]:
        """(number of processes, this one's rank) of the trainer, (1, 0) without one."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def val_dataloader(self) -> DataLoader:
        """Validation samples, ordered as eval_loader says."""
        return self.eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test samples, ordered as eval_loader says."""
        return self.eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """One sample per test answer, in file order, so predictions line up with the file's records."""
        return self.answer_loader("test")

    def answer_loader(self, split: str) -> DataLoader:
        """One sample per answer of a built split, in file order, each with its prompt for generation."""
        if split not in self.per_answer:
            self.per_answer[split] = self.dataset(self.datasets[split].records, Counter(), answers="each")
        return self.loader(self.per_answer[split], batch_size=self.hparams.eval_batch_size)


class PretrainDataModule(LlavaDataModule):
    """Stage I: image + caption, loss on the caption ("plain" template)."""

    def make_template(self, tokenizer: PreTrainedTokenizerBase, num_image_tokens: int) -> Template:
        """Plain captioning template."""
        return PlainTemplate(tokenizer, num_image_tokens)


class InstructionDataModule(LlavaDataModule):
    """Stages II/III: multi-turn conversations, loss on answers; eval has one sample per answer.

    `template` is the conversation format: "vicuna_v1" (USER: / ASSISTANT:, LLaVA-1.5's and
    MoE-LLaVA's) or "chat" (the tokenizer's own chat template; with a transformers processor model,
    stgc.vlm.TransformersVLMModule, its images as the processor's tokens: ProcessorTemplate).
    `system_prompt`: for vicuna_v1, None is Vicuna's sentence and "" none; for chat, a non-empty one is
    sent as the system message, else the chat template's own default (if any) applies.
    """

    TEMPLATES = {"vicuna_v1": InstructionTemplate, "chat": ChatTemplate}

    def __init__(
        self, *, template: str = "vicuna_v1", system_prompt: str | None = None, **kwargs: Any
    ) -> None:
        if template not in self.TEMPLATES:
            raise ValueError(f"template={template!r}; choose from {sorted(self.TEMPLATES)}")
        super().__init__(**kwargs)
        self.system_prompt = system_prompt

    def make_template(self, tokenizer: PreTrainedTokenizerBase, num_image_tokens: int) -> Template:
        """The chosen conversation template with this module's system prompt (if set)."""
        if self.processor is not None and self.hparams.template == "chat":
            return ProcessorTemplate(self.processor, num_image_tokens, self.system_prompt)
        return self.TEMPLATES[self.hparams.template](tokenizer, num_image_tokens, self.system_prompt)
