"""STGC: Solving Token Gradient Conflict in Mixture-of-Experts vision-language models."""

from stgc.callback import STGC

__all__ = ["STGC"]
