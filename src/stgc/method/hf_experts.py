"""STGC's seam into transformers 5.x MoE models (Mixtral, Qwen2/3-MoE, OLMoE, Qwen3-VL-MoE, ...).

Their experts keep fused 3-D weights and dispatch forward through `ExpertsInterface`. We register
an implementation named "stgc" there: the same computation as "eager", grouped by expert with one
sort, which also lets a probe capture each expert's X and Δ. No transformers code is forked.

Notation: N tokens, H hidden, k experts per token, S = N·k assignments, n_e rows of expert e.
"""

import dataclasses

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.integrations.moe import ExpertsInterface

from stgc.constants import MODALITIES
from stgc.method.probes import LayerProbe, LayerRouting, WeightSite, capture_output_terms
from stgc.method.routers import router_rule
from stgc.moe.grouped import Groups, grouped_linear
from stgc.moe.layer import expert_counts
from stgc.precision import to_compute_dtype

IMPLEMENTATION = "stgc"


def _grouped_linear(experts: nn.Module, name: str, inputs: Tensor, groups: Groups) -> Tensor:
    """Every expert's slice of a fused projection on its own rows at once: (S, d_in) -> (S, d_out)."""
    weight = getattr(experts, name)  # (E, d_out, d_in), or (E, d_in, d_out) when transposed
    bias = getattr(experts, f"{name}_bias") if experts.has_bias else None
    return grouped_linear(inputs, weight if experts.is_transposed else weight.transpose(-2, -1), bias, groups)


def stgc_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """Drop-in for transformers' eager experts forward, all experts in one grouped product (as its
    "grouped_mm"); feeds the probe when STGC is capturing, one capture per projection."""
    probe: HFExpertsProbe | None = getattr(self, "_stgc_probe", None)
    capturing = probe is not None and probe.capturing and torch.is_grad_enabled()
    tokens = hidden_states.reshape(-1, hidden_states.shape[-1])  # (N, H)
    top_k = top_k_index.shape[-1]
    flat_expert = top_k_index.reshape(-1)  # (S,) token-major
    order = torch.argsort(flat_expert, stable=True)  # (S,) assignments grouped by expert
    # sentinel experts (index >= num_experts, e.g. under expert parallelism) sort last and are dropped
    in_range = flat_expert.clamp(max=self.num_experts)  # (S,) sentinels share one extra bin
    counts = expert_counts(in_range, self.num_experts + 1)[: self.num_experts]  # (E,)
    sizes = counts.tolist()  # the host sync
    order = order[: sum(sizes)]
    rows = order // top_k  # (S,) token row of each assignment
    groups = Groups(sizes, counts.cumsum(0, dtype=torch.int32), flat_expert.index_select(0, order))
    weights = top_k_weights.reshape(-1).index_select(0, order)  # (S,)
    # (S, H) in the dtype the experts compute in: the tensor autograd keeps, and the probe captures
    routed = to_compute_dtype(tokens.index_select(0, rows))
    up = _grouped_linear(
        self, "gate_up_proj" if self.has_gate else "up_proj", routed, groups
    )  # (S, 2I) or (S, I)
    hidden = self._apply_gate(up) if self.has_gate else self.act_fn(up)  # (S, I)
    out = _grouped_linear(self, "down_proj", hidden, groups)  # (S, H)
    if capturing and probe.capture_exact:
        probe.up_site.capture(groups, routed, up)
        probe.down_site.capture(groups, hidden, out)
    if capturing and probe.capture_output:
        capture_output_terms(probe, groups, out)
    weighted = out * weights[:, None].to(tokens.dtype)  # (S, H)
    combined = torch.zeros_like(tokens).index_add_(0, rows, weighted)  # (N, H)
    if capturing:
        probe.last_routing = LayerRouting(
            tokens.detach(), list(rows.split(sizes)), None, row_experts=groups.row_experts, sorted_rows=rows
        )
        probe.last_choice = top_k_index.detach().reshape(-1, top_k)  # (N, k): for rule_counts
    return combined.view_as(hidden_states)


ExpertsInterface.register(IMPLEMENTATION, stgc_experts_forward)


def is_hf_experts(module: nn.Module) -> bool:
    """A transformers experts module that dispatches through ExpertsInterface."""
    config = getattr(module, "config", None)
    down = getattr(module, "down_proj", None)
    return (
        hasattr(config, "_experts_implementation")
        and isinstance(down, nn.Parameter)
        and down.ndim == 3
        and hasattr(module, "has_gate")
    )


class ModalitySplit:
    """ERNIE-4.5-VL's MoE block: text and vision tokens go to experts of their own (`text_moe`,
    `vision_moe`), split by the token-type mask the block is called with. Remembers that mask at each
    forward, so that each sub-block's probe knows the flat (B*T) positions of the tokens it routed."""

    def __init__(self, block: nn.Module) -> None:
        self.mask: Tensor | None = None  # (B*T,) bool: vision tokens; None when all went to text_moe
        self.handle = block.register_forward_pre_hook(self._remember, with_kwargs=True)

    def _remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        types = kwargs.get("moe_mm_token_type_ids", args[1] if len(args) > 1 else None)
        self.mask = None if types is None or not types.any() else types.reshape(-1).bool()

    def positions(self, vision: bool) -> Tensor | None:
        """(N,) the flat positions the text or vision sub-block routed; None: every position (text)."""
        if self.mask is None:
            return None
        return (self.mask if vision else ~self.mask).nonzero().squeeze(1)


def modality_split_of(
    sparse_block: nn.Module, parents: dict[nn.Module, nn.Module]
) -> tuple[nn.Module, bool] | None:
    """(the ERNIE-style block, whether `sparse_block` is its vision half), or None for other models."""
    block = parents.get(sparse_block)
    if block is not None and getattr(block, "text_moe", None) is not None and hasattr(block, "vision_moe"):
        return block, sparse_block is block.vision_moe
    return None


class HFExpertsProbe(LayerProbe):
    """Probe for a transformers experts module; the router is its sibling (E, H) weight. Where the experts
    serve one modality of a modality-split block (ERNIE-4.5-VL), `split` says which: (its split, vision)."""

    def __init__(
        self,
        name: str,
        experts: nn.Module,
        parent: nn.Module,
        split: tuple[ModalitySplit, bool] | None = None,
    ) -> None:
        router = _find_router(parent, experts)
        if router is None:
            raise ValueError(
                f"STGC found transformers experts at {name!r} but no linear router beside them: "
                f"expected a sibling module with a ({experts.num_experts}, hidden) `weight`"
            )
        bias = getattr(router, "bias", None)
        has_bias = isinstance(bias, nn.Parameter) and bias.shape == (experts.num_experts,)
        top_k = getattr(router, "top_k", None) or experts.config.num_experts_per_tok
        super().__init__(name, experts, router.weight, experts.num_experts, top_k, bias if has_bias else None)
        self.rule = router_rule(router)
        self.last_choice: Tensor | None = None
        self.rule_verified = False  # until `check_rule` accepts it
        up_name = "gate_up_proj" if experts.has_gate else "up_proj"
        self.up_site = WeightSite(self, getattr(experts, up_name), experts.has_bias, experts.is_transposed)
        self.down_site = WeightSite(self, experts.down_proj, experts.has_bias, experts.is_transposed)
        self.last_routing: LayerRouting | None = None
        self.split = split
        experts._stgc_probe = self

    def routing(self) -> LayerRouting:
        """The last captured forward's routing; its rows are the input's B*T positions, in order (or,
        in a modality-split block, those of the modality's tokens: `positions`)."""
        routing = self.last_routing
        if routing is not None and self.split is not None:
            split, vision = self.split
            positions = split.positions(vision)
            rows = routing.router_input.shape[0]
            kind = MODALITIES["image" if vision else "text"]
            constant = torch.full((rows,), kind, dtype=torch.long, device=routing.router_input.device)
            return dataclasses.replace(routing, positions=positions, modality=constant)
        return self.with_position_modality(routing)

    def start(
        self, capturing: bool, gradients: tuple[str, ...] = ("exact",), reference: str = "none"
    ) -> None:
        super().start(capturing, gradients, reference)
        if capturing:  # a layer this micro-batch does not reach must not show the last one's routing
            self.last_routing = self.last_choice = None

    def rule_counts(self) -> Tensor:
        if self.last_routing is None or self.last_choice is None:
            return super().rule_counts()
        with torch.no_grad():
            logits = self.router_logits(self.last_routing.router_input)  # (N, E) float32
            ours = self.rule.choose(logits, self.top_k).sort(-1).values  # (N, k)
            agree = (ours == self.last_choice.sort(-1).values).all(-1)  # (N,)
        return torch.stack([agree.sum(), torch.tensor(agree.numel(), device=agree.device)]).double()

    def remove(self) -> None:
        super().remove()
        del self.experts._stgc_probe
        if self.split is not None:
            self.split[0].handle.remove()


def _find_router(parent: nn.Module, experts: nn.Module) -> nn.Module | None:
    """The first sibling module whose parameter `weight` has shape (num_experts, hidden)."""
    hidden = experts.down_proj.shape[1 if not experts.is_transposed else 2]
    for child in parent.children():
        weight = getattr(child, "weight", None)
        if (
            child is not experts
            and isinstance(weight, nn.Parameter)
            and weight.shape == (experts.num_experts, hidden)
        ):
            return child
    return None


def outermost_transformers_models(module: nn.Module) -> list[PreTrainedModel]:
    """The transformers models inside `module` that no other one contains (parents come first)."""
    models, covered = [], set()
    for model in module.modules():
        if isinstance(model, PreTrainedModel) and id(model) not in covered:
            covered.update(id(child) for child in model.modules())
            models.append(model)
    return models


def switch_experts(
    models: list[PreTrainedModel] | dict[PreTrainedModel, object], implementation: str | None = None
) -> dict[PreTrainedModel, object]:
    """Set each model's experts implementation (a dict: each its own); returns what each used before."""
    chosen = models if isinstance(models, dict) else dict.fromkeys(models, implementation)
    previous = {model: model.get_experts_implementation() for model in chosen}
    for model, choice in chosen.items():
        model.set_experts_implementation(choice)
    return previous


def use_stgc_experts(module: nn.Module) -> dict[PreTrainedModel, object]:
    """Switch every outermost transformers model inside `module` to the "stgc" experts implementation;
    returns what each used before, for `restore_experts`."""
    return switch_experts(outermost_transformers_models(module), IMPLEMENTATION)


def restore_experts(previous: dict[PreTrainedModel, object]) -> None:
    switch_experts(previous)
