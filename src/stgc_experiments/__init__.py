"""Experiments built on stgc: recipes and benchmarks that the library itself never imports."""

from pathlib import Path

# the repository root (the package runs from its source checkout): configs/, data/, README.md
ROOT = Path(__file__).resolve().parents[2]
