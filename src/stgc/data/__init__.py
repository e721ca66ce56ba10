"""LLaVA-format data: records, conversation templates, datasets, collate and DataModules."""

from stgc.data.collate import LlavaCollator
from stgc.data.datamodule import InstructionDataModule, LlavaDataModule, PretrainDataModule
from stgc.data.dataset import LlavaDataset
from stgc.data.records import Record, RecordError, Turn, load_records, parse_record
from stgc.data.templates import (
    DEFAULT_SYSTEM_PROMPT,
    ChatTemplate,
    InstructionTemplate,
    PlainTemplate,
    Template,
)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "InstructionDataModule",
    "ChatTemplate",
    "InstructionTemplate",
    "LlavaCollator",
    "LlavaDataModule",
    "LlavaDataset",
    "PlainTemplate",
    "PretrainDataModule",
    "Record",
    "RecordError",
    "Template",
    "Turn",
    "load_records",
    "parse_record",
]
