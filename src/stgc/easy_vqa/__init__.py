"""The bundled easy-vqa dataset: its preparation (prepare) and DataModules (datamodule); the stage
chain that `make train` runs is stgc_experiments.pipeline. The general package (stgc.data, stgc.module)
does not use it."""

from stgc.easy_vqa.datamodule import EasyVQAInstructionDataModule, EasyVQAPretrainDataModule

__all__ = ["EasyVQAInstructionDataModule", "EasyVQAPretrainDataModule"]
