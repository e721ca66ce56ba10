"""`stgc fit|validate|test|predict -c config.yaml`: LightningCLI over the LVLM and the LLaVA DataModules.

`run()` is for use in a process (it returns the CLI, with its trainer and metrics); `main()` is the
`stgc` console script and `python -m stgc`, which return an exit status.
"""

import importlib
import os
import sys

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from stgc.predictions import AnswerWriter

# What a user's input can raise (a bad value, a missing or unreadable file, a bad record): a message, no traceback.
USER_ERRORS = (ValueError, OSError, MisconfigurationException)


class STGCCLI(LightningCLI):
    """LightningCLI that gives evaluations a place of their own and writes predict's answers.

    validate, test and predict log under `<subcommand>/` inside a TensorBoardLogger's run folder
    (its `sub_dir`), so a stage's `config.yaml`, the record of how its checkpoint was trained, and
    its training events stay as fit left them; with any other logger their config file is named
    `<subcommand>_config.yaml`.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """`--answers.path`: where predict writes its answers (see stgc.predictions.AnswerWriter)."""
        parser.add_lightning_class_args(AnswerWriter, "answers")

    def before_instantiate_classes(self) -> None:
        """Point an evaluation's logs away from the training run it evaluates."""
        if self.subcommand in (None, "fit"):
            return
        config = self.config[self.subcommand]
        loggers = (
            config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
        )
        tensorboard = [
            logger
            for logger in loggers
            if hasattr(logger, "class_path") and _is_subclass(logger.class_path, TensorBoardLogger)
        ]
        for logger in tensorboard:
            logger.init_args.sub_dir = os.path.join(logger.init_args.get("sub_dir") or "", self.subcommand)
        if not tensorboard:
            self.save_config_kwargs["config_filename"] = f"{self.subcommand}_config.yaml"


def _is_subclass(class_path: str, base: type) -> bool:
    """Whether the class named by a config's class_path is `base` or derives from it."""
    module, _, name = class_path.rpartition(".")
    return issubclass(getattr(importlib.import_module(module), name), base)


def run(args: list[str] | None = None) -> LightningCLI:
    """Run one subcommand in this process and return the CLI; configs may use omegaconf interpolation."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub
    return STGCCLI(
        LightningModule,  # configs name the class: stgc.module.LVLMModule, stgc.vision_pretrain.CLIPPretrainModule
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},  # stage runs have fixed versions, so reruns overwrite
        args=args,
    )


def main(args: list[str] | None = None) -> int:
    """The `stgc` command: 0 after a successful run; 1 with a one-line message when the input is bad
    (a value, a file, a record); 2 with the usage for an unknown or ill-typed argument (jsonargparse)."""
    try:
        run(args)
    except USER_ERRORS as err:
        print(f"stgc: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
