"""`trainable`: which named parameter groups of a model train; every other parameter is frozen."""

from collections.abc import Mapping, Sequence

from torch import nn


def check_groups(trainable: Sequence[str], known: Sequence[str]) -> None:
    """ValueError naming the groups of `trainable` that are not among `known`."""
    unknown = sorted(set(trainable) - set(known))
    if unknown:
        raise ValueError(f"trainable={list(trainable)}: unknown groups {unknown}; choose from {tuple(known)}")


def train_only(
    model: nn.Module, groups: Mapping[str, list[nn.Parameter]], trainable: Sequence[str], why_empty: str
) -> None:
    """Freeze `model` but the parameters of the `trainable` groups; a group without parameters is an
    error, `why_empty` its explanation."""
    check_groups(trainable, list(groups))
    model.requires_grad_(False)
    for group in trainable:
        if not groups[group]:
            raise ValueError(f"trainable group {group!r} has no parameters {why_empty}")
        for parameter in groups[group]:
            parameter.requires_grad_(True)
