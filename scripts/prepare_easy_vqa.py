"""Write the bundled easy-VQA dataset in LLaVA format, with its tokenizer (idempotent)."""

import argparse

from stgc.easy_vqa.prepare import prepare


def main() -> None:
    """Parse --out and prepare the dataset there."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="data/easy_vqa", help="output folder (default: data/easy_vqa)")
    prepare(parser.parse_args().out)


if __name__ == "__main__":
    main()
