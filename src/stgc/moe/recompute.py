"""What a forward hook needs to know under activation checkpointing: whether it runs in the first
forward of a checkpointed layer or in its recomputation inside backward, and what the first saw.

torch.utils.checkpoint (non-reentrant) calls `context_fn` once per checkpointed call and enters its
two context managers around the first forward and around the recomputation. `checkpoint_phases`
gives both the same frame, so the first forward can leave values there for the recomputation: the
probes ask for Δ in the first forward but keep no X (the layer's activations are freed) and take X
again in the recomputation, so nothing is captured twice; a MoE layer gets back the routing context
that has exited by the time backward runs.
"""

import threading
from collections.abc import Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel

FIRST = "first"  # the checkpointed layer's forward: its activations are not kept
RECOMPUTE = "recompute"  # the same forward re-run inside backward


@dataclass
class Frame:
    """One checkpointed call: the phase now running, and what its first forward left for the recomputation."""

    phase: str
    store: dict[Hashable, Any] = field(default_factory=dict)


_local = threading.local()  # a recomputation runs in the thread that runs the backward


def current_frame() -> Frame | None:
    """The checkpointed call this code runs inside (marked by `checkpoint_phases`), else None."""
    return getattr(_local, "frame", None)


@contextmanager
def _entered(frame: Frame, phase: str) -> Iterator[None]:
    previous = current_frame()
    frame.phase = phase
    _local.frame = frame
    try:
        yield
    finally:
        _local.frame = previous


def checkpoint_phases() -> tuple[AbstractContextManager, AbstractContextManager]:
    """`context_fn` for torch.utils.checkpoint: marks the first forward and its recomputation."""
    frame = Frame(FIRST)
    return _entered(frame, FIRST), _entered(frame, RECOMPUTE)


@contextmanager
def replaying(obj: object, names: Sequence[str]) -> Iterator[None]:
    """Run a forward with `obj`'s attributes `names` as its checkpointed call's first forward saw
    them: the first forward records them, its recomputation sets them back for its duration."""
    frame = current_frame()
    if frame is None:
        yield
        return
    if frame.phase == FIRST:
        frame.store[obj] = [getattr(obj, name) for name in names]
        yield
        return
    now = [getattr(obj, name) for name in names]
    for name, value in zip(names, frame.store[obj], strict=True):
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in zip(names, now, strict=True):
            setattr(obj, name, value)


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute `model`'s decoder layers in backward (transformers' checkpointing, non-reentrant),
    with the phases marked for the probes."""
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_phases}
    )
