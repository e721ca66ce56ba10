"""One pass over all experts of a layer whose experts are modules of their own (SparseMoE): what each
expert's hook receives in backward goes into tensors for the whole layer, and the last expert's hook
finishes every expert's terms at once, so that STGC's operators are per layer, not per expert
(docs/design.md §3). Only the product with each expert's own G stays per expert, as the experts' own
products in backward are.

Notation: E experts, S rows of all experts sorted by expert (Groups), n_e rows of expert e.
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from stgc.method.cosine import term_dtypes
from stgc.method.grouped import ALL, Groups, per_expert_sums
from stgc.precision import autocast_off


def rows_of(blocks: Sequence[Tensor]) -> Tensor:
    """The (Σ n_e, d) concatenation of 2-D row blocks (n_e, d): a view when they already lie one after
    another in one storage (the split of one tensor, the gradients of a concatenation), else a copy."""
    first = blocks[0]
    offset = first.storage_offset()
    storage = first.untyped_storage().data_ptr()
    for block in blocks:
        if (
            block.ndim != 2
            or not block.is_contiguous()
            or block.untyped_storage().data_ptr() != storage
            or block.storage_offset() != offset
            or block.dtype != first.dtype
            or block.shape[1] != first.shape[1]
        ):
            return torch.cat(list(blocks))
        offset += block.numel()
    rows, width = sum(block.shape[0] for block in blocks), first.shape[1]
    return first.as_strided((rows, width), (width, 1), first.storage_offset())


class _Countdown:
    """Counts the pieces a layer's hooks expect in backward (`expect`: one per capture in forward) and
    calls `finish` when the last arrives (or at `flush`, for a capture whose backward never came)."""

    def __init__(self, groups: Callable[[], Groups]) -> None:
        self.groups = groups  # where each expert's rows are, this micro-batch
        self.clear()

    def clear(self) -> None:
        self.expected = self.received = 0

    def expect(self) -> None:
        self.expected += 1

    def arrived(self) -> None:
        self.received += 1
        if self.received == self.expected:
            self.flush()

    def flush(self) -> None:
        if self.received:
            self.finish()
        self.clear()

    def finish(self) -> None:
        raise NotImplementedError

    def rows(self, expert: int, count: int, what: str) -> slice:
        """Expert `expert`'s rows among all experts' (S,); RuntimeError unless it brought `count` of them."""
        sizes = self.groups().sizes
        if count != sizes[expert]:
            raise RuntimeError(
                f"STGC: expert {expert}'s {what} holds {count} rows where its layer routed it {sizes[expert]} "
                "(one forward per micro-batch is captured)"
            )
        start = sum(sizes[:expert])
        return slice(start, start + count)

    def check_complete(self, arrived: dict[int, Tensor], what: str) -> None:
        """RuntimeError unless every expert that the layer routed rows to sent its piece."""
        missing = [e for e, size in enumerate(self.groups().sizes) if size and e not in arrived]
        if missing:
            raise RuntimeError(f"STGC: no {what} reached experts {missing}")


class OutputGather(_Countdown):
    """The "output" gradient's terms of every expert at once, from Δ at each expert's output (which the
    experts' concatenation hands back as one tensor's rows: no copy), through `add_terms(groups, Δ)`:
    stgc.method.probes.add_output_terms, as for transformers' fused experts."""

    def __init__(self, groups: Callable[[], Groups], add_terms: Callable[[Groups, Tensor], None]) -> None:
        super().__init__(groups)
        self.add_terms = add_terms

    def clear(self) -> None:
        super().clear()
        self.deltas: dict[int, Tensor] = {}

    def receive(self, expert: int, grad: Tensor) -> None:
        self.deltas[expert] = grad.reshape(-1, grad.shape[-1])  # (n_e, H)
        self.arrived()

    def finish(self) -> None:
        for expert, delta in self.deltas.items():
            self.rows(expert, delta.shape[0], "output gradient")
        self.check_complete(self.deltas, "gradient at the output")
        self.add_terms(self.groups(), rows_of([self.deltas[e] for e in sorted(self.deltas)]))  # (S, H)


class LinearGather(_Countdown):
    """The same nn.Linear of every expert of a layer (the j-th of each). δ_iᵀ G_e x_i goes through the
    narrower product, as `cosine.row_terms` takes it: each expert's weight hook multiplies its rows by its
    G_e and writes their dot products with the narrower side, and the norms of the wider side, into (S,)
    tensors for the whole layer (the (n_e, d) product is freed at once, as the expert's own temporaries
    are: a tensor of all rows' products, fresh each step, slows a CPU step by what glibc's returned pages
    cost); the last one takes the narrower side's norms and the bias terms of all experts at once."""

    def __init__(
        self, groups: Callable[[], Groups], add_terms: Callable[[int, Tensor, Tensor], None], has_bias: bool
    ) -> None:
        super().__init__(groups)
        self.add_terms = add_terms  # LayerProbe.add_terms(ALL, ⟨g_i, G⟩, ‖g_i‖²)
        self.has_bias = has_bias

    def clear(self) -> None:
        super().clear()
        self.narrow: dict[int, Tensor] = {}  # expert -> its rows of the narrower side (X or Δ)
        self.dot: Tensor | None = None  # (S,) ⟨narrower side, its product with G⟩ of every row
        self.wide_norm: Tensor | None = None  # (S,) ‖wider side‖
        self.bias_dot: Tensor | None = None  # (S,) δ_iᵀ Σδ of the expert's rows, where Δ is the wider side

    def receive(self, expert: int, x: Tensor, delta: Tensor, grad_weight: Tensor) -> None:
        """Expert `expert`'s X (n_e, d_in), Δ (n_e, d_out) and G (d_out, d_in) of this micro-batch."""
        with autocast_off(x):
            rows = self.rows(expert, x.shape[0], "captured input")
            self.x_narrow = x.shape[1] < delta.shape[1]  # δ_iᵀ G x_i = (Gᵀ δ_i)ᵀ x_i
            wide, narrow = (delta, x) if self.x_narrow else (x, delta)
            if self.dot is None:  # the layer's first expert: the dtypes of all
                self.dtypes = term_dtypes(x.dtype, delta.dtype)
                total = sum(self.groups().sizes)
                self.dot, self.wide_norm = wide.new_empty(2, total, dtype=self.dtypes[0])
                if self.has_bias and self.x_narrow:
                    self.bias_dot = wide.new_empty(total, dtype=self.dtypes[0])
            accumulate, product = self.dtypes
            matrix = _in(grad_weight, product)
            products = _in(wide, product) @ (matrix if self.x_narrow else matrix.mT)  # (n_e, narrower width)
            torch.linalg.vecdot(_in(narrow, accumulate), _in(products, accumulate), out=self.dot[rows])
            torch.linalg.vector_norm(wide, dim=1, dtype=accumulate, out=self.wide_norm[rows])
            if self.has_bias and self.x_narrow:
                delta = delta.to(accumulate)
                torch.mv(delta, delta.sum(0), out=self.bias_dot[rows])
            self.narrow[expert] = narrow
        self.arrived()

    def finish(self) -> None:
        self.check_complete(self.narrow, "weight gradient")
        groups = self.groups()
        narrow = rows_of([self.narrow[e] for e in sorted(self.narrow)])  # (S, narrower width)
        with autocast_off(narrow):
            accumulate = self.dot.dtype
            narrow_sqnorm = torch.linalg.vector_norm(narrow, dim=1, dtype=accumulate).square()
            wide_sqnorm = self.wide_norm.square()
            x_sqnorm, delta_sqnorm = (
                (narrow_sqnorm, wide_sqnorm) if self.x_narrow else (wide_sqnorm, narrow_sqnorm)
            )
            sqnorm = delta_sqnorm * (x_sqnorm + 1 if self.has_bias else x_sqnorm)
            dot = self.dot
            if self.has_bias and self.x_narrow:
                dot = dot + self.bias_dot
            elif self.has_bias:  # Δ is the narrower side: each expert's Σδ at once
                narrow = narrow.to(accumulate)
                totals = per_expert_sums(narrow, groups, len(groups.sizes))  # (E, d_out)
                dot = dot + torch.linalg.vecdot(narrow, totals.index_select(0, groups.row_experts))
        self.add_terms(ALL, dot, sqnorm)


def _in(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """`tensor` in `dtype`, without a call where it is already (each is an operator per expert)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
