"""Generate the bundled Sort-of-CLEVR dataset in LLaVA format, with its tokenizer (seeded, idempotent)."""

import argparse

from stgc.sort_of_clevr.prepare import prepare


def main() -> None:
    """Parse --out and --seed and generate the dataset there."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", default="data/sort_of_clevr", help="output folder (default: data/sort_of_clevr)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the scenes' seed (default: 0)")
    args = parser.parse_args()
    prepare(args.out, args.seed)


if __name__ == "__main__":
    main()
