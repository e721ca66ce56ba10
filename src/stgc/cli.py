"""`stgc fit|validate|test|predict -c config.yaml`: LightningCLI over the LVLM and the LLaVA DataModules."""

import os

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI; configs may use omegaconf interpolation."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub
    return LightningCLI(
        LightningModule,  # configs name the class: stgc.module.LVLMModule, stgc.vision_pretrain.CLIPPretrainModule
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},  # stage runs have fixed versions, so reruns overwrite
        args=args,
    )


if __name__ == "__main__":
    main()
