"""Experiments built on stgc: recipes and benchmarks that the library itself never imports."""
