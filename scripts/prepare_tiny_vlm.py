"""Write the tiny processors that configs/vlm/*_tiny.yaml read, over easy-vqa's words.

Qwen3-VL-MoE, GLM-4.5V, Llama 4, ERNIE-4.5-VL and Aria, each its family's own processor class.

python scripts/prepare_tiny_vlm.py                 # data/vlm/<family>_tiny_processor (make data-vlm)
python scripts/prepare_tiny_vlm.py --families glm4v_moe --out DIR --data data/easy_vqa
"""

import argparse
from pathlib import Path

from stgc.easy_vqa.prepare import prepare
from stgc_experiments import ROOT
from stgc_experiments.tiny_vlm import PROCESSORS, save_processor


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=ROOT / "data" / "easy_vqa", help="easy-vqa (prepared if missing)"
    )
    parser.add_argument("--families", nargs="+", choices=list(PROCESSORS), default=list(PROCESSORS))
    parser.add_argument(
        "--out", type=Path, default=ROOT / "data" / "vlm", help="<out>/<family>_tiny_processor"
    )
    args = parser.parse_args()
    files = [args.data / f"instruct_{split}.json" for split in ("train", "test")]
    if not all(file.is_file() for file in files):
        prepare(args.data)
    for family in args.families:
        print(save_processor(family, files, args.out / f"{family}_tiny_processor"))


if __name__ == "__main__":
    main()
