"""The bundled easy-vqa dataset: its preparation (prepare), DataModules (datamodule) and the stage
chain that `make train` runs (pipeline). The general package (stgc.data, stgc.module) does not use it."""

from stgc.easy_vqa.datamodule import EasyVQAInstructionDataModule, EasyVQAPretrainDataModule

__all__ = ["EasyVQAInstructionDataModule", "EasyVQAPretrainDataModule"]
