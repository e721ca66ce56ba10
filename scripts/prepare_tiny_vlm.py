"""Write the tiny Qwen3-VL processor that configs/vlm/qwen3_vl_moe_tiny.yaml reads, over easy-vqa's words.

python scripts/prepare_tiny_vlm.py                 # data/vlm/qwen3_vl_tiny_processor (make data-vlm)
python scripts/prepare_tiny_vlm.py --out DIR --data data/easy_vqa
"""

import argparse
from pathlib import Path

from stgc.easy_vqa.prepare import prepare
from stgc_experiments import ROOT
from stgc_experiments.tiny_vlm import save_qwen3_vl_processor


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=ROOT / "data" / "easy_vqa", help="easy-vqa (prepared if missing)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "vlm" / "qwen3_vl_tiny_processor")
    args = parser.parse_args()
    files = [args.data / f"instruct_{split}.json" for split in ("train", "test")]
    if not all(file.is_file() for file in files):
        prepare(args.data)
    print(save_qwen3_vl_processor(files, args.out))


if __name__ == "__main__":
    main()
