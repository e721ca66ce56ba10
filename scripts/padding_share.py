"""Padded share of batches on easy-vqa with and without group_by_length (stage II settings).

    python scripts/padding_share.py

Lengths are the real token counts of the encoded samples; batches follow the DataModule's orders.
"""

import argparse
import os

import torch
from transformers import AutoTokenizer

from stgc.data import InstructionDataModule
from stgc.data.sampler import LengthGroupedSampler
from stgc.easy_vqa.pipeline import stage_data_args

DATA = "data/easy_vqa"
IMAGE_TOKENS = 16  # configs/easy_vqa/model.yaml: the 8x8 patch grid pooled 2x2


def padded_share(order: list[int], lengths: list[int], batch_size: int) -> float:
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return 1 - sum(lengths) / sum(max(lengths[i] for i in b) * len(b) for b in batches)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help; no options
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stage2 = stage_data_args("stage2")
    data = InstructionDataModule(
        train_json=f"{DATA}/instruct_train.json",
        image_folder=f"{DATA}/images",
        system_prompt=stage2["system_prompt"],
        batch_size=stage2["batch_size"],
        max_length=stage2["max_length"],
    )
    no_image = lambda image: torch.zeros(1)  # noqa: E731 (only the token counts matter here)
    data.attach(AutoTokenizer.from_pretrained(f"{DATA}/tokenizer"), no_image, no_image, IMAGE_TOKENS)
    data.setup("fit")
    for split, batch_size in (("train", stage2["batch_size"]), ("val", data.hparams.eval_batch_size)):
        dataset = data.datasets[split]
        tokens = [
            len(dataset.template.encode(dataset.records[r], stage2["max_length"], t).input_ids)
            for r, t in dataset.index
        ]
        estimate = dataset.lengths
        if split == "train":
            plain = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0)).tolist()
            grouped = list(LengthGroupedSampler(estimate, batch_size, seed=0))
        else:
            plain = list(range(len(tokens)))  # file order
            grouped = sorted(range(len(estimate)), key=estimate.__getitem__)
        print(
            f"{split}: padded share {padded_share(plain, tokens, batch_size):.3f} without group_by_length, "
            f"{padded_share(grouped, tokens, batch_size):.3f} with it"
        )


if __name__ == "__main__":
    main()
