"""Per-MoE-layer probes: capture each expert linear's inputs X and output gradients Δ, and turn
them into exact token-gradient cosine terms during backward (docs/design.md §3).

A probe keeps X by reference in forward, takes Δ from a tensor hook on the linear's output, and
takes G = ΔᵀX from a hook on the weight itself, which fires with this micro-batch's gradient
before it is accumulated into `.grad` (and before DDP averages it). So the terms cost one extra
product X·Gᵀ per expert linear, and nothing is kept once the weight hook has run. Under FSDP2
the weight is a shard and G is formed from X and Δ (one more product, docs/design.md §7).

Notation: N routed tokens of the layer, E experts, n_e rows processed by expert e.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stgc.conflict.cosine import cosine_from_terms, linear_gradient_terms
from stgc.conflict.recompute import RECOMPUTE, current_frame
from stgc.conflict.sharding import is_sharded


@dataclass
class LayerRouting:
    """Where one layer's last forward sent its tokens (references, no copies)."""

    router_input: Tensor  # (N, H) the tensor the router's logits were computed from
    expert_rows: list[Tensor]  # E tensors: rows into the N tokens, in each expert's input order
    modality: Tensor | None  # (N,) 0 text / 1 image, or None when unknown


@dataclass
class LayerConflicts:
    """Cosines of one layer's (token, expert) assignments for one micro-batch."""

    cosine: Tensor  # (S,) cos(g_t, ḡ_e); 0 where the token has no gradient
    rows: Tensor  # (S,) token row into the layer's N routed tokens
    expert: Tensor  # (S,) expert index
    has_grad: Tensor  # (S,) bool: the token's gradient in that expert is non-zero
    modality: Tensor | None  # (S,) or None
    finite: Tensor  # () bool: every gradient term was finite (a NaN/inf micro-batch is skipped)


class LayerProbe(ABC):
    """One MoE layer as STGC sees it: its router weight, its routing, and the cosine terms."""

    def __init__(self, name: str, router_weight: nn.Parameter, num_experts: int) -> None:
        self.name = name
        self.router_weight = router_weight  # (E, H)
        self.num_experts = num_experts
        self.capturing = False
        self.handles: list = []
        self.sites: list[WeightSite] = []  # its expert weights
        self._terms: dict[int, list[Tensor]] = {}  # expert -> [⟨g_i,G⟩ (n_e,), ‖g_i‖² (n_e,), ‖G‖² ()]

    @abstractmethod
    def routing(self) -> LayerRouting:
        """Where the last captured forward sent this layer's tokens."""

    def start(self, capturing: bool) -> None:
        """Begin a micro-batch: forget the last one's terms; capture only when asked."""
        self.capturing = capturing
        self._terms.clear()

    def add_terms(self, expert: int, dot: Tensor, sqnorm: Tensor, total_sqnorm: Tensor) -> None:
        """Add one linear's terms to the expert's running sums over its linears."""
        terms = self._terms.get(expert)
        if terms is None:
            self._terms[expert] = [dot, sqnorm, total_sqnorm]
        else:
            terms[0], terms[1], terms[2] = terms[0] + dot, terms[1] + sqnorm, terms[2] + total_sqnorm

    def conflicts(self) -> LayerConflicts:
        """Cosine of every (token, expert) assignment whose expert saw gradient this micro-batch."""
        routing = self.routing()
        cosines, rows, experts, has_grad, finite = [], [], [], [], []
        for expert, (dot, sqnorm, total_sqnorm) in sorted(self._terms.items()):
            finite.append(
                torch.isfinite(dot).all() & torch.isfinite(sqnorm).all() & torch.isfinite(total_sqnorm)
            )
            cosines.append(cosine_from_terms(dot, sqnorm, total_sqnorm))  # (n_e,)
            rows.append(routing.expert_rows[expert])  # (n_e,)
            experts.append(torch.full_like(rows[-1], expert))  # (n_e,)
            has_grad.append(sqnorm > 0)  # (n_e,)
        device = self.router_weight.device
        if not cosines:
            empty = torch.zeros(0, device=device)
            return LayerConflicts(empty, empty.long(), empty.long(), empty.bool(), None, torch.tensor(True))
        rows_cat = torch.cat(rows)  # (S,)
        modality = None if routing.modality is None else routing.modality.index_select(0, rows_cat)  # (S,)
        return LayerConflicts(
            torch.cat(cosines),
            rows_cat,
            torch.cat(experts),
            torch.cat(has_grad),
            modality,
            torch.stack(finite).all(),
        )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class WeightSite:
    """One expert weight — an nn.Linear's (d_out, d_in), or a fused (E, d_out, d_in) one shared by all
    experts (transposed: (E, d_in, d_out)) — and the X/Δ captured for it in this micro-batch.

    A weight sharded by FSDP2 (a DTensor) never receives this rank's unsharded gradient, so its terms
    come from X and Δ alone, as soon as Δ arrives (G = ΔᵀX: one more product). Under activation
    checkpointing X is taken in the recomputation, not in the first forward (conflict/recompute.py).
    """

    def __init__(
        self,
        probe: LayerProbe,
        weight: nn.Parameter,
        has_bias: bool,
        expert: int | None,
        transposed: bool = False,
    ) -> None:
        if not weight.requires_grad:
            raise ValueError(
                f"STGC needs trainable experts: a weight of {probe.name} has requires_grad=False"
            )
        self.probe = probe
        self.has_bias = has_bias
        self.expert = expert  # None: fused, indexed by the captured expert
        self.transposed = transposed
        self.sharded = is_sharded(weight)
        probe.sites.append(self)
        self._pending: list[list] = []  # [expert, X (n, d_in), Δ (n, d_out) or None]
        if not self.sharded:
            probe.handles.append(weight.register_hook(self._on_weight_grad))

    def capture(self, expert: int, inputs: Tensor, outputs: Tensor) -> None:
        """Keep X by reference and ask autograd for Δ = ∂loss/∂outputs."""
        inputs = inputs.detach().reshape(-1, inputs.shape[-1])  # (n, d_in)
        frame = current_frame()
        if frame is not None and frame.phase == RECOMPUTE:  # X for the first forward's entry, no new one
            frame.store[self].pop(0)[1] = inputs
            return
        entry = [expert, inputs if frame is None else None, None]
        if frame is not None:  # a checkpointed layer: its recomputation brings X
            frame.store.setdefault(self, []).append(entry)
        if not self.sharded:
            self._pending.append(entry)

        def keep_output_grad(grad: Tensor) -> None:
            entry[2] = grad.reshape(-1, grad.shape[-1])
            if self.sharded:
                self._add_terms(entry, grad_weight=None)

        outputs.register_hook(keep_output_grad)

    def _on_weight_grad(self, grad: Tensor) -> None:
        """Fires with this micro-batch's weight gradient: G for each captured expert is at hand."""
        for entry in self._pending:
            grad_weight = grad if self.expert is not None else grad[entry[0]]
            self._add_terms(entry, grad_weight.T if self.transposed else grad_weight)  # (d_out, d_in)
        self._pending.clear()

    def _add_terms(self, entry: list, grad_weight: Tensor | None) -> None:
        """The entry's cosine terms, added to its expert's; G = ΔᵀX is formed when `grad_weight` is None."""
        expert, inputs, output_grads = entry
        if output_grads is None:  # the output did not reach the loss
            return
        if inputs is None:
            raise RuntimeError(
                f"STGC: the recomputation of a checkpointed layer did not reach {self.probe.name}'s "
                f"expert {expert}, so its inputs are missing"
            )
        terms = linear_gradient_terms(inputs, output_grads, grad_weight=grad_weight, has_bias=self.has_bias)
        self.probe.add_terms(expert, *terms)


class SparseMoEProbe(LayerProbe):
    """Probe for this project's SparseMoE: experts are modules of nn.Linear layers."""

    def __init__(self, name: str, layer: nn.Module) -> None:
        super().__init__(name, layer.router.weight, layer.num_experts)
        self.layer = layer
        for expert, module in enumerate(layer.experts):
            for linear in module.modules():
                if isinstance(linear, nn.Linear):
                    site = WeightSite(self, linear.weight, linear.bias is not None, expert)
                    self.handles.append(linear.register_forward_hook(self._capture_hook(site, expert)))

    def _capture_hook(self, site: WeightSite, expert: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if self.capturing and torch.is_grad_enabled():
                site.capture(expert, args[0], output)

        return hook

    def routing(self) -> LayerRouting:
        record = self.layer.last_routing
        return LayerRouting(record.router_input, record.expert_rows, record.modality)
