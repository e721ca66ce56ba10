"""Per-MoE-layer probes: capture each expert linear's inputs X and output gradients Δ, and turn
them into exact token-gradient cosine terms during backward (docs/design.md §3).

A probe keeps X by reference in forward, takes Δ from a tensor hook on the linear's output, and
takes G = ΔᵀX from a hook on the weight itself, which fires with this micro-batch's gradient
before it is accumulated into `.grad` (and before DDP averages it). So the terms cost one extra
product X·Gᵀ per expert linear, and nothing is kept once the weight hook has run. Under FSDP2
the weight is a shard and G is formed from X and Δ (one more product, docs/design.md §7).

Two token gradients (STGC's `gradient=`): "exact", the gradient w.r.t. all of the expert's weights
(above); "output", the gradient w.r.t. the expert's output (routing weight included), the cheaper
approximation the paper validates against the full one: its terms come from Δ at the output alone.

Notation: N routed tokens of the layer, E experts, n_e rows processed by expert e.
"""

import dataclasses
import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stgc.method.cosine import cosine_from_terms, leave_one_out_cosine, row_terms
from stgc.method.distributed import full_tensor, is_sharded
from stgc.method.flat import repeated
from stgc.method.routers import SOFTMAX
from stgc.method.tracing import traced
from stgc.moe.experts import expert_linears
from stgc.moe.grouped import Groups, per_expert_sums
from stgc.moe.layer import expert_counts
from stgc.moe.recompute import RECOMPUTE, current_frame

REFERENCES = ("none", "keep", "use")  # see LayerProbe.start
RULE_AGREEMENT = 0.95  # share of tokens whose chosen experts the rule must reproduce (ties differ in bf16)
GRADIENTS = ("exact", "output")  # which token gradient the cosines are of (see the module docstring)
MEANS = ("all", "others")  # compared with the sum over all of the expert's tokens, or over the others
ALL = -1  # the expert key of terms that cover every expert's rows, in expert order (a fused weight's)


@dataclass
class LayerRouting:
    """Where one layer's last forward sent its tokens (references, no copies)."""

    router_input: Tensor  # (N, H) the tensor the router's logits were computed from
    expert_rows: list[Tensor]  # E tensors: rows into the N tokens, in each expert's input order
    modality: Tensor | None  # (N,) 0 text / 1 image, or None when unknown
    positions: Tensor | None = (
        None  # (N,) each token's position in the flattened (B*T) input; None: row = position
    )
    row_experts: Tensor | None = None  # (S,) the expert of each row of torch.cat(expert_rows), if known
    sorted_rows: Tensor | None = None  # (S,) torch.cat(expert_rows), where the layer has it (fused experts)


@dataclass
class LayerConflicts:
    """Cosines of one layer's (token, expert) assignments for one micro-batch."""

    cosine: Tensor  # (S,) cos(g_t, ḡ_e) of the chosen gradient and mean; 0 where the token has no gradient
    rows: Tensor  # (S,) token row into the layer's N routed tokens
    expert: Tensor  # (S,) expert index
    has_grad: Tensor  # (S,) bool: the token's gradient in that expert is non-zero
    modality: Tensor | None  # (S,) or None
    finite: Tensor  # () bool: every gradient term was finite (a NaN/inf micro-batch is skipped)
    cosines: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # gradient -> (S,), each captured
    sqnorm: Tensor | None = None  # (S,) ‖g_t‖² of the chosen gradient (the null level's weights); None: equal


class LayerProbe(ABC):
    """One MoE layer as STGC sees it: its router weight, its routing, and the cosine terms."""

    def __init__(
        self,
        name: str,
        experts: nn.Module,
        router_weight: nn.Parameter,
        num_experts: int,
        top_k: int,
        router_bias: nn.Parameter | None = None,
    ) -> None:
        self.name = name
        self.experts = experts  # the layer's experts module: its parameters are fused, (E, ...) each
        self.router_weight = router_weight  # (E, H)
        self.router_bias = router_bias  # (E,) or None: the router's logits are x Wᵀ (+ b)
        self.num_experts = num_experts
        self.top_k = top_k
        self.rule = SOFTMAX  # how the router chooses and scores (stgc.method.routers)
        self.rule_verified = True  # SparseMoE's router is softmax top-k by construction
        self.capturing = False
        self.position_modality: Tensor | None = None  # (B*T,) per input position, when the model says
        self.capture_exact = False  # keep X and Δ of every expert linear
        self.capture_output = False  # keep Δ of every expert's output
        self.handles: list = []
        self.sites: list[WeightSite] = []  # the expert weights whose gradients give the exact terms
        # gradient -> expert -> [⟨g_i,G⟩ (n_e,), ‖g_i‖² (n_e,)], summed over the expert's linears
        self._terms: dict[str, dict[int, list[Tensor]]] = {gradient: {} for gradient in GRADIENTS}
        self.reference_mode = "none"
        # a kept micro-batch's sums: (site or "output", expert) -> (G, Σδ or None), and per gradient its
        # ‖G‖² per expert (E,) with the experts that had terms
        self.reference: dict[tuple, tuple[Tensor, Tensor | None]] = {}
        self._reference_totals: dict[str, tuple[Tensor, set[int]]] = {}

    @abstractmethod
    def routing(self) -> LayerRouting:
        """Where the last captured forward sent this layer's tokens."""

    def expert_weights(self) -> list[Tensor]:
        """The experts' weights, each fused over the experts: (E, ...)."""
        return [p.detach() for p in self.experts.parameters()]

    def with_position_modality(self, routing: LayerRouting | None) -> LayerRouting:
        """`routing` with each token's modality from `position_modality`, when its rows are the input's
        positions (as many as the model gave modalities for); no routing: one of no tokens (a layer the
        micro-batch did not reach, e.g. ERNIE-4.5-VL's vision experts on a text-only batch)."""
        if routing is None:
            weight = self.router_weight
            nothing = torch.zeros(0, dtype=torch.long, device=weight.device)
            return LayerRouting(
                weight.new_zeros(0, weight.shape[1]), [nothing] * self.num_experts, None, nothing
            )
        modality = self.position_modality
        if modality is None or modality.numel() != routing.router_input.shape[0]:
            return routing
        return dataclasses.replace(routing, modality=modality)

    def rule_counts(self) -> Tensor:
        """(2,) float64: of the last captured forward's tokens, those whose experts `rule` chooses as the
        router did, and all of them; zeros where the probe does not see the router's choice."""
        return torch.zeros(2, dtype=torch.float64, device=self.router_weight.device)

    def check_rule(self, agreeing: float, tokens: float) -> None:
        """Accept `rule` once it reproduced at least RULE_AGREEMENT of `tokens` (counted over all ranks,
        so that every rank decides alike); ValueError when it did not."""
        if tokens == 0:
            return  # nothing seen yet: checked on a later step
        if agreeing / tokens < RULE_AGREEMENT:
            raise ValueError(
                f"STGC's router rule for {self.name} ({self.rule.scores}"
                f"{', correction bias' if self.rule.bias_owner is not None else ''}) picks the router's "
                f"experts for only {agreeing / tokens:.0%} of the tokens: this router family is not "
                "supported yet (stgc.method.routers lists those that are)"
            )
        self.rule_verified = True

    def router_parameters(self) -> list[nn.Parameter]:
        """The parameters the CEL's gradient goes to: the router's weight, and its bias if it has one."""
        return [self.router_weight] + ([self.router_bias] if self.router_bias is not None else [])

    def router_logits(
        self, router_input: Tensor, weight: Tensor | None = None, bias: Tensor | None = None
    ) -> Tensor:
        """(N, E) float32 logits from (N, H) router inputs, as the router computes them; `weight` and
        `bias` replace the router's own (e.g. gathered from their FSDP2 shards)."""
        weight = full_tensor(self.router_weight) if weight is None else weight  # gathered under FSDP2
        bias = full_tensor(self.router_bias) if bias is None and self.router_bias is not None else bias
        logits = router_input.float() @ weight.float().T
        return logits if bias is None else logits + bias.float()

    def start(
        self, capturing: bool, gradients: tuple[str, ...] = ("exact",), reference: str = "none"
    ) -> None:
        """Begin a micro-batch: forget the last one's terms; capture the terms of `gradients` when asked.

        reference="keep" also keeps this micro-batch's summed gradients (G per expert weight, Σδ at
        each expert's output) until `drop_reference`; "use" computes the next micro-batch's cosines
        against those kept sums instead of its own (how a fixed sample is compared with a training
        batch's experts, stgc.callback's conflict picture)."""
        self.capture_exact = capturing and "exact" in gradients
        self.capture_output = capturing and "output" in gradients
        self.capturing = self.capture_exact or self.capture_output
        if reference == "keep":
            self.drop_reference()
        self.reference_mode = reference
        for terms in self._terms.values():
            terms.clear()

    def drop_reference(self) -> None:
        """Release the kept sums (they hold the experts' weight gradients of one micro-batch)."""
        self.reference.clear()
        self._reference_totals.clear()
        self.reference_mode = "none"

    def add_terms(self, expert: int, dot: Tensor, sqnorm: Tensor, gradient: str = "exact") -> None:
        """Add one linear's (or, for "output", the expert output's) ⟨g_i, G⟩ and ‖g_i‖² to the expert's
        running sums (‖G‖² is their Σ_i ⟨g_i, G⟩, taken once per expert in `conflicts`)."""
        terms = self._terms[gradient].get(expert)
        if terms is None:
            self._terms[gradient][expert] = [dot, sqnorm]
        else:
            terms[0], terms[1] = terms[0] + dot, terms[1] + sqnorm

    def conflicts(self, gradient: str = "exact", mean: str = "all") -> LayerConflicts:
        """This layer's `all_conflicts`."""
        return all_conflicts([self], gradient, mean)[0]

    def _assignments(self, gradient: str) -> "_Assignments | None":
        """The (token, expert) assignments whose expert saw gradient of the chosen kind, with each captured
        gradient's terms over them; None when there are none. Against a kept reference, only the experts
        that had kept tokens (the others have nothing to compare with)."""
        routing = self.routing()
        # fused experts: the terms are in the routing's expert order already (no split, no concatenation)
        if self._fused_only(routing, gradient):
            if routing.sorted_rows.numel() == 0:
                return None
            terms = {name: tuple(terms[ALL]) for name, terms in self._terms.items() if terms}
            modality = (
                None if routing.modality is None else routing.modality.index_select(0, routing.sorted_rows)
            )
            return _Assignments(routing.sorted_rows, routing.row_experts, terms, modality)
        sizes = [rows.shape[0] for rows in routing.expert_rows]
        for terms in self._terms.values():  # every expert's rows at once (a fused weight's): per expert
            if ALL in terms:
                parts = [part.split(sizes) for part in terms.pop(ALL)]
                terms.update(
                    {e: [dot, sqnorm] for e, (dot, sqnorm) in enumerate(zip(*parts, strict=True)) if sizes[e]}
                )
        if self.reference_mode == "use":
            for name, terms in self._terms.items():
                kept = self._reference_totals[name][1] if name in self._reference_totals else set()
                for expert in [e for e in terms if e not in kept]:
                    del terms[expert]
        experts = sorted(self._terms[gradient])
        if not experts:
            return None
        rows = torch.cat([routing.expert_rows[e] for e in experts])  # (S,)
        counts = [size if e in self._terms[gradient] else 0 for e, size in enumerate(sizes)]
        expert = routing.row_experts  # (S,)
        if expert is None or counts != sizes:  # some experts' rows are not in the terms
            expert = repeated(torch.arange(self.num_experts, device=rows.device), counts)
        terms = {
            name: self._concatenated(terms, experts, routing.expert_rows)
            for name, terms in self._terms.items()
            if terms
        }
        modality = None if routing.modality is None else routing.modality.index_select(0, rows)  # (S,)
        return _Assignments(rows, expert, terms, modality)

    def _fused_only(self, routing: LayerRouting, gradient: str) -> bool:
        """Whether the chosen gradient's terms, and any other captured beside it, cover all experts' rows
        at once (fused weights), so that they are in the order of the routing's sorted rows already; not
        with a kept reference, whose sums are per expert."""
        captured = [terms for terms in self._terms.values() if terms]
        return (
            self._terms[gradient].keys() == {ALL}
            and all(terms.keys() == {ALL} for terms in captured)
            and self.reference_mode == "none"
            and routing.sorted_rows is not None
            and routing.row_experts is not None
        )

    @staticmethod
    def _concatenated(
        terms: dict[int, list[Tensor]], experts: list[int], expert_rows: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """⟨g_i, G⟩ and ‖g_i‖² (S,) over the `experts`' rows in order; NaN for an expert that the terms
        do not reach (the other gradient, captured beside the chosen one, may miss one)."""
        like = next(iter(terms.values()))[0]
        parts = []
        for e in experts:
            if e in terms:
                parts.append(terms[e])
            else:
                missing = like.new_full((expert_rows[e].numel(),), float("nan"))
                parts.append((missing, missing))
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


@dataclass
class _Assignments:
    """One layer's assignments with a gradient, as `all_conflicts` gathers them (expert: the layer's own)."""

    rows: Tensor  # (S,)
    expert: Tensor  # (S,)
    terms: dict[str, tuple[Tensor, Tensor]]  # gradient -> ⟨g_i, G⟩, ‖g_i‖² (S,); NaN where not captured
    modality: Tensor | None  # (S,)


def all_conflicts(
    probes: list[LayerProbe], gradient: str = "exact", mean: str = "all"
) -> list[LayerConflicts]:
    """Per layer, the cosine of every (token, expert) assignment whose expert saw gradient this micro-batch,
    of the chosen `gradient`'s terms, against the sum over all the expert's tokens or over the `others`;
    `cosines` also holds the other gradient's, in the same order, when it was captured too. Against a kept
    reference, the cosines are with its sums (the tokens are not in them: `mean` plays no part). All layers
    in one pass (no operator repeats per layer); `finite` is that of every layer's terms."""
    found = [(probe, probe._assignments(gradient)) for probe in probes]
    present = [(probe, layer) for probe, layer in found if layer is not None]
    if not present:
        return [_no_conflicts(probe) for probe in probes]
    using = present[0][0].reference_mode == "use"
    cosine_of = leave_one_out_cosine if mean == "others" and not using else cosine_from_terms
    starts = [0, *itertools.accumulate(probe.num_experts for probe, _ in present)]  # each layer's first slot
    slot = torch.cat(
        [layer.expert + start for (_, layer), start in zip(present, starts, strict=False)]
    )  # (P,)
    sizes = [layer.rows.shape[0] for _, layer in present]
    names = [name for name in GRADIENTS if any(name in layer.terms for _, layer in present)]
    by_gradient: dict[str, Tensor] = {}
    for name in names:
        dot, sqnorm = (
            torch.cat(column)
            for column in zip(*(_terms_of(layer, name) for _, layer in present), strict=True)
        )
        if using:
            expert_total = torch.cat([_kept_total(probe, name) for probe, _ in present])
        else:  # ‖G_e‖² = Σ_i ⟨g_i, G_e⟩ over each expert's rows
            expert_total = expert_counts(slot, starts[-1], dot)  # (Σ E,)
            for (probe, _), start in zip(present, starts, strict=False):
                if probe.reference_mode == "keep":
                    own = expert_total[start : start + probe.num_experts]
                    probe._reference_totals[name] = (own, set(probe._terms[name]))
        total = expert_total.index_select(0, slot)  # (P,)
        by_gradient[name] = cosine_of(dot, sqnorm, total)
        if name == gradient:
            chosen_sqnorm = sqnorm
            finite = (dot + sqnorm + total).isfinite().all()  # a NaN or inf in any term stays one
    has_grad = (chosen_sqnorm > 0).split(sizes)
    norms = chosen_sqnorm.split(sizes)
    cosines = {name: cosine.split(sizes) for name, cosine in by_gradient.items()}
    conflicts = {}
    for index, (probe, layer) in enumerate(present):
        own = {name: split[index] for name, split in cosines.items()}
        conflicts[probe] = LayerConflicts(
            own[gradient],
            layer.rows,
            layer.expert,
            has_grad[index],
            layer.modality,
            finite,
            own,
            norms[index],
        )
    return [conflicts.get(probe) or _no_conflicts(probe) for probe in probes]


def _terms_of(layer: _Assignments, gradient: str) -> tuple[Tensor, Tensor]:
    """The layer's terms of `gradient`, NaN where it was not captured."""
    if gradient in layer.terms:
        return layer.terms[gradient]
    like = next(iter(layer.terms.values()))[0]
    missing = like.new_full(layer.rows.shape, float("nan"))
    return missing, missing


def _kept_total(probe: LayerProbe, gradient: str) -> Tensor:
    """The kept micro-batch's ‖G_e‖² (E,) of `gradient` (NaN when it kept none)."""
    kept = probe._reference_totals.get(gradient)
    return kept[0] if kept is not None else probe.router_weight.new_full((probe.num_experts,), float("nan"))


def _no_conflicts(probe: LayerProbe) -> LayerConflicts:
    """A layer without assignments that saw gradient."""
    empty = torch.zeros(0, device=probe.router_weight.device)
    return LayerConflicts(empty, empty.long(), empty.long(), empty.bool(), None, torch.tensor(True))


class WeightSite:
    """One fused expert weight, (E, d_out, d_in) for all experts of a layer (transposed: (E, d_in, d_out)),
    and the X/Δ captured for it in this micro-batch: of every expert at once, or of one expert at a time.

    A weight sharded by FSDP2 (a DTensor) never receives this rank's unsharded gradient, so its terms
    come from X and Δ alone, as soon as Δ arrives (G = ΔᵀX: one more product). Under activation
    checkpointing X is taken in the recomputation, not in the first forward (moe/recompute.py).
    """

    def __init__(
        self,
        probe: LayerProbe,
        weight: nn.Parameter,
        has_bias: bool,
        transposed: bool = False,
    ) -> None:
        if not weight.requires_grad:
            raise ValueError(
                f"STGC needs trainable experts: a weight of {probe.name} has requires_grad=False"
            )
        self.probe = probe
        self.weight = weight
        self.has_bias = has_bias
        self.transposed = transposed
        self.sharded = is_sharded(weight)
        self._pending: list[list] = []  # [expert, X (n, d_in), Δ (n, d_out) or None]
        if not self.sharded:
            probe.handles.append(weight.register_hook(self._on_weight_grad))
        probe.sites.append(self)

    @traced("stgc.capture")
    def capture(self, expert: int | Groups, inputs: Tensor, outputs: Tensor) -> None:
        """Keep X by reference and ask autograd for Δ = ∂loss/∂outputs: of one expert, or of every expert
        of a fused weight at once (`Groups`: the rows of all experts, sorted by expert)."""
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

    @traced("stgc.weight_hook")
    def _on_weight_grad(self, grad: Tensor) -> None:
        """Fires with this micro-batch's weight gradient: G for each captured expert is at hand."""
        for entry in self._pending:
            grad_weight = grad if isinstance(entry[0], Groups) else grad[entry[0]]
            self._add_terms(entry, grad_weight.mT if self.transposed else grad_weight)  # (E,) d_out, d_in
        self._pending.clear()

    def _add_terms(self, entry: list, grad_weight: Tensor | None) -> None:
        """The entry's cosine terms, added to its expert's; G = ΔᵀX is formed when `grad_weight` is None.
        With reference_mode "keep" the micro-batch's G (and Σδ for a bias) is kept too."""
        expert, inputs, output_grads = entry
        if output_grads is None:  # the output did not reach the loss
            return
        inputs = self._inputs_of(inputs, expert)
        groups = expert if isinstance(expert, Groups) else None
        if groups is not None and grad_weight is None:  # a sharded fused weight: G formed per expert
            parts = zip(inputs.split(groups.sizes), output_grads.split(groups.sizes), strict=True)
            for e, (expert_inputs, expert_output_grads) in enumerate(parts):
                if expert_inputs.shape[0]:
                    self._add_terms([e, expert_inputs, expert_output_grads], None)
            return
        key = ALL if groups is not None else expert
        mode = self.probe.reference_mode
        if mode == "use":  # against a kept micro-batch (LayerProbe.start): its G and Σδ replace our own
            kept = self.probe.reference.get((self, key))
            if kept is not None:
                terms = row_terms(inputs, output_grads, kept[0], kept[1], self.has_bias, groups=groups)
                self.probe.add_terms(key, *terms)
            return
        terms = row_terms(inputs, output_grads, grad_weight, None, self.has_bias, groups=groups)
        self.probe.add_terms(key, *terms)
        if mode == "keep" and grad_weight is not None:
            self.probe.reference[(self, key)] = (grad_weight, self._bias_total(output_grads, groups))

    def _inputs_of(self, inputs: Tensor | None, expert: object) -> Tensor:
        """The captured X; RuntimeError where a checkpointed layer's recomputation never brought it."""
        if inputs is None:
            raise RuntimeError(
                f"STGC: the recomputation of a checkpointed layer did not reach {self.probe.name}'s "
                f"expert {expert}, so its inputs are missing"
            )
        return inputs

    def _bias_total(self, output_grads: Tensor, groups: Groups | None) -> Tensor | None:
        """Σδ of the expert's rows (d_out,), or of each expert's (E, d_out); None without a bias."""
        if not self.has_bias:
            return None
        return (
            output_grads.sum(0)
            if groups is None
            else per_expert_sums(output_grads, groups, len(groups.sizes))
        )


def capture_output_terms(probe: LayerProbe, expert: int | Groups, outputs: Tensor) -> None:
    """Ask autograd for Δ at one expert's output (n_e, H), or at every expert's (`Groups`: rows sorted by
    expert), and turn it into the "output" gradient's terms there: ⟨δ_i, Σδ⟩ and ‖δ_i‖², Σδ over the
    expert's rows (nothing is kept once the hook has run)."""

    @traced("stgc.output_hook")
    def output_terms(grad: Tensor) -> None:
        add_output_terms(probe, expert, grad)

    outputs.register_hook(output_terms)


def add_output_terms(probe: LayerProbe, expert: int | Groups, grad: Tensor) -> None:
    """The "output" gradient's terms from Δ at one expert's output (n_e, H), or at every expert's
    (`Groups`: rows sorted by expert)."""
    groups = expert if isinstance(expert, Groups) else None
    key = ALL if groups is not None else expert

    def dot_with(delta: Tensor, total: Tensor) -> Tensor:  # ⟨δ_i, Σδ of its expert⟩ (n,)
        return (
            delta @ total
            if groups is None
            else torch.linalg.vecdot(delta, total.index_select(0, groups.row_experts))
        )

    delta = grad.reshape(-1, grad.shape[-1]).to(torch.promote_types(grad.dtype, torch.float32))  # (n_e, H)
    if probe.reference_mode == "use":  # compare with a kept micro-batch's Σδ (see LayerProbe.start)
        kept = probe.reference.get(("output", key))
        if kept is not None:
            probe.add_terms(key, dot_with(delta, kept[0]), delta.square().sum(1), "output")
        return
    total = delta.sum(0) if groups is None else per_expert_sums(delta, groups, len(groups.sizes))  # (E,) H
    probe.add_terms(key, dot_with(delta, total), delta.square().sum(1), "output")
    if probe.reference_mode == "keep":
        probe.reference[("output", key)] = (total, None)


class SparseMoEProbe(LayerProbe):
    """Probe for this project's SparseMoE: its experts are the dense MLP with fused weights, run once per
    layer on every expert's rows (stgc.moe.experts), so each fused linear is one site of all experts, as
    in transformers' fused experts."""

    def __init__(self, name: str, layer: nn.Module) -> None:
        super().__init__(
            name, layer.experts, layer.router.weight, layer.num_experts, layer.top_k, layer.router.bias
        )
        self.layer = layer
        self.linears = expert_linears(self.experts)
        for linear in self.linears:
            site = WeightSite(self, linear.weight, linear.bias is not None)
            self.handles.append(linear.register_forward_hook(self._capture_hook(site)))
        self.handles.append(layer.experts.register_forward_hook(self._output_hook))

    def _capture_hook(self, site: WeightSite):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if self.capture_exact and torch.is_grad_enabled():
                site.capture(module.groups, args[0], output)

        return hook

    def _output_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self.capture_output and torch.is_grad_enabled():
            capture_output_terms(self, self.linears[0].groups, output)  # the groups of this forward

    def routing(self) -> LayerRouting:
        record = self.layer.last_routing
        modality = record.modality  # the routing context's (LVLM), else the one given per position
        if modality is None and self.position_modality is not None:
            modality = self.position_modality.index_select(0, record.token_index)
        return LayerRouting(
            record.router_input,
            record.expert_rows,
            modality,
            record.token_index,
            record.groups.row_experts,
            record.sorted_rows,
        )
