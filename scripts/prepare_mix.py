"""Train one tokenizer on the text of several prepared datasets (the mixed pipeline's: easy-vqa + Sort-of-CLEVR)."""

import argparse
import json
from pathlib import Path

from stgc.data.preparation import conversation_texts, train_tokenizer


def main() -> None:
    """Read every pretrain_*/instruct*_*.json file of the given folders and train the tokenizer on them."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folders", nargs="+", type=Path, help="prepared datasets (data/easy_vqa ...)")
    parser.add_argument("--out", default="data/mix/tokenizer", type=Path, help="default: data/mix/tokenizer")
    args = parser.parse_args()
    files = [f for folder in args.folders for pattern in ("pretrain_*.json", "instruct*_*.json")
             for f in sorted(folder.glob(pattern))]  # fmt: skip
    if not files:
        parser.error(f"no pretrain_*.json or instruct*_*.json files in {[str(f) for f in args.folders]}")
    records = [record for f in files for record in json.loads(f.read_text())]
    vocab_size = train_tokenizer(conversation_texts(records), args.out)
    print(
        f"tokenizer in {args.out}: vocab {vocab_size}, trained on {len(records)} records of {len(files)} files"
    )


if __name__ == "__main__":
    main()
