"""Count the host-device synchronisations of a region of code, on any device.

On CUDA, every op that needs a value on the host (`.item()`, `bool(t)`, `.tolist()`, `nonzero`,
boolean-mask indexing, `bincount`, `unique`, `repeat_interleave` without `output_size`, a copy
to the CPU) stalls the GPU pipeline. On a CPU they cost nothing and cannot be seen, so this counts
calls to those known sync points instead: a dispatch mode sees the ops (in backward hooks too),
and two Tensor methods that never dispatch on a CPU are wrapped while the counter is active.
`torch.cuda.set_sync_debug_mode` is the ground truth where a GPU is at hand (scripts/gpu_check.py).
"""

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {  # aten ops whose output needs device values on the host
    "aten._local_scalar_dense.default": "item",  # .item(), bool(), int(), float()
    "aten.nonzero.default": "nonzero",
    "aten.bincount.default": "bincount",
    "aten._unique2.default": "unique",
    "aten.unique_dim.default": "unique",
    "aten.unique_consecutive.default": "unique",
    "aten.masked_select.default": "masked_select",
}


class HostSyncCounter(TorchDispatchMode):
    """`with HostSyncCounter() as syncs: ...` then `syncs.total` and `syncs.by_kind` (a Counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_kind: Counter[str] = Counter()
        self._wrapped: dict[str, Any] = {}

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in SYNC_OPS:
            self.by_kind[SYNC_OPS[name]] += 1
        elif name == "aten.index.Tensor" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        ):
            self.by_kind["boolean_index"] += 1
        elif name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size") is None:
            self.by_kind["repeat_interleave"] += 1
        return func(*args, **kwargs)

    def __enter__(self) -> "HostSyncCounter":
        for method in ("tolist", "cpu"):  # host reads that a CPU tensor serves without dispatching
            original = getattr(torch.Tensor, method)
            self._wrapped[method] = original
            setattr(torch.Tensor, method, self._counting(method, original))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for method, original in self._wrapped.items():
            setattr(torch.Tensor, method, original)
        self._wrapped.clear()
        return super().__exit__(*exc)

    def _counting(self, kind: str, original: Any) -> Any:
        def method(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if tensor.device.type != "cpu" or kind == "tolist":  # a CPU tensor's .cpu() moves nothing
                self.by_kind[kind] += 1
            return original(tensor, *args, **kwargs)

        return method
