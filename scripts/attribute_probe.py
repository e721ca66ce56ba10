"""Does a checkpoint read the asked attribute in easy-vqa's yes/no questions? For test images, the
teacher-forced logit(" yes") - logit(" no") of "is there a <colour> shape?" for each of the 8
colours: a model that compares the asked colour with the image gives the image's own colour a
much higher margin; one that ignores the asked word gives the same margin for all 8.

    python scripts/attribute_probe.py logs/easy_vqa/stage2/checkpoints/last.ckpt --images 25
"""

import argparse
import json
import os

import torch
from PIL import Image

from stgc.constants import IMAGE_TOKEN_ID
from stgc.easy_vqa.pipeline import stage_data_args
from stgc.easy_vqa.prepare import PALETTE
from stgc.module import LVLMModule

DATA = "data/easy_vqa"
SYSTEM_PROMPT = stage_data_args("stage2")["system_prompt"]  # the layout the checkpoint was trained on


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--images", type=int, default=25, help="first N test images")
    args = parser.parse_args()
    module = LVLMModule.load_from_checkpoint(args.checkpoint, map_location="cpu", init_from=None).eval()
    tokenizer, transform = module.tokenizer, module.image_transform(False)
    yes, no = (tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in (" yes", " no"))
    prefix = tokenizer(f"{SYSTEM_PROMPT} USER: ", add_special_tokens=False)["input_ids"]
    prefix += [IMAGE_TOKEN_ID] * module.num_image_tokens
    questions = {
        colour: prefix
        + tokenizer(f"\nis there a {colour} shape? ASSISTANT:", add_special_tokens=False)["input_ids"]
        for colour in PALETTE
    }
    print("image colour | margin for its own colour | margins for the others (min..max)")
    spreads = []
    for record in json.load(open(f"{DATA}/pretrain_test.json"))[: args.images]:
        caption = record["conversations"][1]["value"]  # "a blue rectangle"
        own = next(word for word in caption.split() if word in PALETTE)
        image = transform(Image.open(f"{DATA}/images/{record['image']}").convert("RGB"))[None]
        margins = {}
        with torch.no_grad():
            for colour, ids in questions.items():
                input_ids = torch.tensor([ids])
                logits = module.model(image, input_ids, torch.ones_like(input_ids)).logits[0, -1]
                margins[colour] = float(logits[yes] - logits[no])
        others = [m for colour, m in margins.items() if colour != own]
        spreads.append(max(margins.values()) - min(margins.values()))
        print(f"{own:>8} | {margins[own]:+.2f} | {min(others):+.2f}..{max(others):+.2f}")
    print(f"mean spread of the 8 margins per image: {sum(spreads) / len(spreads):.3f}")


if __name__ == "__main__":
    main()
