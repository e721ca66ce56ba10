"""STGC's seam into Llama 4's MoE layers (transformers' Llama4TextMoe), whose experts do not dispatch
through ExpertsInterface: every expert runs on every token, the token's input scaled by its sigmoid
router score (0 for the experts it did not choose), beside a shared expert.

While STGC captures, the experts module runs `experts_forward`: the same result computed on each
expert's chosen tokens only (an expert's output and gradients on a zero input are zero), which lets the
probe capture each expert's X and Δ. Its weights are fused and transposed: (E, H, 2I) and (E, I, H).

Notation: N tokens, H hidden, E experts, n_e tokens that chose expert e.
"""

import types

import torch
from torch import Tensor, nn

from stgc.method.probes import LayerProbe, LayerRouting, WeightSite, capture_output_terms
from stgc.method.routers import RouterRule


def is_llama4_moe(module: nn.Module) -> bool:
    """A Llama 4 MoE block: its router, its fused experts, its shared expert."""
    return type(module).__name__ == "Llama4TextMoe" and all(
        hasattr(module, name) for name in ("router", "experts", "shared_expert")
    )


def experts_forward(experts: nn.Module, hidden_states: Tensor) -> Tensor:
    """Llama4TextExperts.forward on (E*N, H) score-scaled inputs, feeding the probe while it captures."""
    probe: Llama4Probe = experts._stgc_probe
    scores = probe.scores
    if not (probe.capturing and torch.is_grad_enabled()) or scores is None:
        return type(experts).forward(experts, hidden_states)
    num_experts, hidden = experts.num_experts, experts.hidden_size
    routed = hidden_states.view(num_experts, -1, hidden)  # (E, N, H)
    chosen = scores.T > 0  # (E, N): the experts' chosen tokens (sigmoid of a finite logit)
    counts = chosen.sum(1).tolist()  # the host sync
    rows = chosen.nonzero()[:, 1].split(counts)  # E tensors (n_e,): token rows, expert-major
    outputs = []
    for expert, expert_rows in enumerate(rows):
        inputs = routed[expert].index_select(0, expert_rows)  # (n_e, H)
        gate_up = inputs @ experts.gate_up_proj[expert]  # (n_e, 2I)
        gate, up = gate_up.chunk(2, dim=-1)
        inner = up * experts.act_fn(gate)  # (n_e, I)
        out = inner @ experts.down_proj[expert]  # (n_e, H)
        if probe.capture_exact:
            probe.up_site.capture(expert, inputs, gate_up)
            probe.down_site.capture(expert, inner, out)
        if probe.capture_output:
            capture_output_terms(probe, expert, out)
        outputs.append(out)
    flat_rows = torch.cat([r + expert * routed.shape[1] for expert, r in enumerate(rows)])  # into E*N
    combined = hidden_states.new_zeros(hidden_states.shape).index_copy(0, flat_rows, torch.cat(outputs))
    probe.last_routing = LayerRouting(probe.router_input, list(rows), None)
    return combined


class Llama4Probe(LayerProbe):
    """Probe for a Llama 4 MoE block: the router's logits z = x Wᵀ, top-k of them, sigmoid scores."""

    def __init__(self, name: str, block: nn.Module) -> None:
        router, experts = block.router, block.experts
        super().__init__(name, experts, router.weight, block.num_experts, block.top_k)
        self.rule = RouterRule("sigmoid")
        self.up_site = WeightSite(self, experts.gate_up_proj, False, transposed=True)
        self.down_site = WeightSite(self, experts.down_proj, False, transposed=True)
        self.scores: Tensor | None = None  # (N, E) the router's last scores, while capturing
        self.router_input: Tensor | None = None  # (N, H)
        self.last_routing: LayerRouting | None = None
        self.handles.append(router.register_forward_hook(self._remember))
        experts._stgc_probe = self
        experts.forward = types.MethodType(experts_forward, experts)

    def _remember(self, router: nn.Module, args: tuple, output: tuple[Tensor, Tensor]) -> None:
        if self.capturing:
            self.router_input = args[0].detach()
            self.scores = output[0].detach()

    def start(
        self, capturing: bool, gradients: tuple[str, ...] = ("exact",), reference: str = "none"
    ) -> None:
        super().start(capturing, gradients, reference)
        self.scores = self.router_input = None
        if capturing:
            self.last_routing = None

    def routing(self) -> LayerRouting:
        """The last captured forward's routing; its rows are the input's B*T positions, in order."""
        return self.with_position_modality(self.last_routing)

    def remove(self) -> None:
        super().remove()
        del self.experts._stgc_probe
        del self.experts.forward
