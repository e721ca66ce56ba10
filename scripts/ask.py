"""Ask a trained checkpoint a question about an image file.

python scripts/ask.py logs/easy_vqa/stage3_stgc/checkpoints/last.ckpt data/easy_vqa/images/test/0.png "what color is the shape?"
"""

import argparse
import os

import torch
from PIL import Image

from stgc.data.collate import pad_token_id, prompt_batch
from stgc.data.records import Record, Turn
from stgc.data.templates import InstructionTemplate
from stgc.module import LVLMModule
from stgc_experiments.pipeline import stage_data_args


def ask(checkpoint: str, image_path: str, question: str, system_prompt: str) -> str:
    module = LVLMModule.load_from_checkpoint(checkpoint, map_location="cpu", init_from=None).eval()
    template = InstructionTemplate(module.tokenizer, module.num_image_tokens, system_prompt)
    record = Record(id="ask", image=None, turns=(Turn(f"<image>\n{question}", ""),), source=image_path)
    encoded = template.encode(record, max_length=10_000, turn=0)
    prompt_ids = torch.tensor(encoded.input_ids[: encoded.prompt_length])  # (P,) up to " ASSISTANT:"
    image = module.image_transform(train=False)(Image.open(image_path).convert("RGB"))[None]
    return module.answer({"images": image, **prompt_batch([prompt_ids], pad_token_id(module.tokenizer))})[0]


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("image")
    parser.add_argument("question")
    parser.add_argument("--system-prompt", default=stage_data_args("stage2")["system_prompt"])
    args = parser.parse_args()
    print(ask(args.checkpoint, args.image, args.question, args.system_prompt))


if __name__ == "__main__":
    main()
