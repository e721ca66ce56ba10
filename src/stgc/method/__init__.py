"""STGC's method, torch only: exact token-gradient cosines inside MoE experts, the flagging rule, the
selection, the conflict elimination loss and its router gradient, the statistics (no Lightning here)."""

from stgc.method.core import StepResult, STGCMethod, find_moe_probes
from stgc.method.selection import GradientSelection, RandomSelection, Selection, SelectionStep
from stgc.method.settings import Settings

__all__ = [
    "GradientSelection",
    "RandomSelection",
    "STGCMethod",
    "Selection",
    "SelectionStep",
    "Settings",
    "StepResult",
    "find_moe_probes",
]
