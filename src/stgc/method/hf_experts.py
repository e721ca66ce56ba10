"""STGC's seam into transformers 5.x MoE models (Mixtral, Qwen2/3-MoE, OLMoE, Qwen3-VL-MoE, ...).

Their experts keep fused 3-D weights and dispatch forward through `ExpertsInterface`. We register
an implementation named "stgc" there: the same computation as "eager", grouped by expert with one
sort, which also lets a probe capture each expert's X and Δ. No transformers code is forked.

Notation: N tokens, H hidden, k experts per token, S = N·k assignments, n_e rows of expert e.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.integrations.moe import ExpertsInterface

from stgc.method.probes import LayerProbe, LayerRouting, WeightSite, capture_output_terms
from stgc.moe.layer import expert_counts
from stgc.precision import to_compute_dtype

IMPLEMENTATION = "stgc"


def _expert_linear(experts: nn.Module, name: str, expert: int, inputs: Tensor) -> Tensor:
    """One expert's slice of a fused projection: (n_e, d_in) -> (n_e, d_out)."""
    weight = getattr(experts, name)[expert]  # (d_out, d_in), or (d_in, d_out) when transposed
    outputs = inputs @ weight if experts.is_transposed else F.linear(inputs, weight)
    if experts.has_bias:
        outputs = outputs + getattr(experts, f"{name}_bias")[expert]
    return outputs


def stgc_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """Drop-in for transformers' eager experts forward; feeds the probe when STGC is capturing."""
    probe: HFExpertsProbe | None = getattr(self, "_stgc_probe", None)
    capturing = probe is not None and probe.capturing and torch.is_grad_enabled()
    tokens = hidden_states.reshape(-1, hidden_states.shape[-1])  # (N, H)
    top_k = top_k_index.shape[-1]
    flat_expert = top_k_index.reshape(-1)  # (S,) token-major
    order = torch.argsort(flat_expert, stable=True)  # (S,) assignments grouped by expert
    # sentinel experts (index >= num_experts, e.g. under expert parallelism) sort last and are dropped
    in_range = flat_expert.clamp(max=self.num_experts)  # (S,) sentinels share one extra bin
    counts = expert_counts(in_range, self.num_experts + 1)[: self.num_experts].tolist()  # the host sync
    order = order[: sum(counts)]
    rows = order // top_k  # (S,) token row of each assignment
    weights = top_k_weights.reshape(-1).index_select(0, order)  # (S,)
    up_name = "gate_up_proj" if self.has_gate else "up_proj"
    expert_outputs = []
    # (S, H) in the dtype the experts compute in: the tensor autograd keeps, and the probe captures
    routed = to_compute_dtype(tokens.index_select(0, rows))
    for expert, expert_inputs in enumerate(routed.split(counts)):  # (n_e, H)
        if expert_inputs.shape[0] == 0:
            continue
        up = _expert_linear(self, up_name, expert, expert_inputs)  # (n_e, 2I) or (n_e, I)
        hidden = self._apply_gate(up) if self.has_gate else self.act_fn(up)  # (n_e, I)
        out = _expert_linear(self, "down_proj", expert, hidden)  # (n_e, H)
        if capturing and probe.capture_exact:
            probe.up_site.capture(expert, expert_inputs, up)
            probe.down_site.capture(expert, hidden, out)
        if capturing and probe.capture_output:
            capture_output_terms(probe, expert, out)
        expert_outputs.append(out)
    combined = torch.zeros_like(tokens)  # (N, H)
    if expert_outputs:
        weighted = torch.cat(expert_outputs) * weights[:, None].to(tokens.dtype)  # (S, H)
        combined.index_add_(0, rows, weighted)
    if capturing:
        probe.last_routing = LayerRouting(tokens.detach(), list(rows.split(counts)), None)
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


class HFExpertsProbe(LayerProbe):
    """Probe for a transformers experts module; the router is its sibling (E, H) weight."""

    def __init__(self, name: str, experts: nn.Module, parent: nn.Module) -> None:
        router = _find_router(parent, experts)
        if router is None:
            raise ValueError(
                f"STGC found transformers experts at {name!r} but no linear router beside them: "
                f"expected a sibling module with a ({experts.num_experts}, hidden) `weight`"
            )
        bias = getattr(router, "bias", None)
        has_bias = isinstance(bias, nn.Parameter) and bias.shape == (experts.num_experts,)
        top_k = getattr(router, "top_k", None) or experts.config.num_experts_per_tok
        super().__init__(name, router.weight, experts.num_experts, top_k, bias if has_bias else None)
        up_name = "gate_up_proj" if experts.has_gate else "up_proj"
        self.up_site = WeightSite(
            self, getattr(experts, up_name), experts.has_bias, None, experts.is_transposed
        )
        self.down_site = WeightSite(self, experts.down_proj, experts.has_bias, None, experts.is_transposed)
        self.last_routing: LayerRouting | None = None
        experts._stgc_probe = self
        self._experts = experts

    def routing(self) -> LayerRouting:
        """The last captured forward's routing; its rows are the input's B*T positions, in order."""
        routing, modality = self.last_routing, self.position_modality
        if modality is not None and routing is not None and modality.numel() == routing.router_input.shape[0]:
            routing = dataclasses.replace(routing, modality=modality)
        return routing

    def expert_weights(self) -> list[list[Tensor]]:
        fused = [p.detach() for p in self._experts.parameters()]  # each (E, ...)
        return [[weight[expert] for weight in fused] for expert in range(self.num_experts)]

    def remove(self) -> None:
        super().remove()
        del self._experts._stgc_probe


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
