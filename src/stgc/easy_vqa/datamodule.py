"""easy-vqa's DataModules: the LLaVA ones, preparing the bundled data when a file is missing and
reporting accuracy by easy-vqa's question types."""

from pathlib import Path
from typing import Any

from stgc.data.datamodule import InstructionDataModule, LlavaDataModule, PretrainDataModule
from stgc.easy_vqa.prepare import QUESTION_TYPES, prepare


def prepare_if_missing(datamodule: LlavaDataModule) -> None:
    """Write easy-vqa next to train_json when one of the DataModule's files is missing."""
    h = datamodule.hparams
    if not all(Path(f).is_file() for f in (h.train_json, h.val_json, h.test_json) if f):
        prepare(Path(h.train_json).parent)


class EasyVQAPretrainDataModule(PretrainDataModule):
    """Stage 0/I on easy-vqa's captions (pretrain_*.json)."""

    def prepare_data(self) -> None:
        """Prepare easy-vqa if a file is missing (once, on the main process)."""
        prepare_if_missing(self)


class EasyVQAInstructionDataModule(InstructionDataModule):
    """Stages II/III on easy-vqa's questions (instruct_*.json), scored per QUESTION_TYPES."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(question_types=QUESTION_TYPES, **kwargs)

    def prepare_data(self) -> None:
        """Prepare easy-vqa if a file is missing (once, on the main process)."""
        prepare_if_missing(self)
