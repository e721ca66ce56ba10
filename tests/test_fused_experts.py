"""SparseMoE's fused experts as STGC sees them: exact cosines for biased experts and an expert without
tokens, and hooks whose operators per layer do not grow with the number of experts."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from stgc.method.probes import SparseMoEProbe
from stgc.moe import SparseMoE
from stgc.moe.experts import expert_mlp
from stgc_experiments.bench import layer_operators, method_profile, tiny_sparse_moe
from support.brute_force import token_gradients

HIDDEN, INTERMEDIATE, EXPERTS = 6, 16, 4


def _biased_layer() -> SparseMoE:
    """float64 SparseMoE of a biased GELU MLP (as Phi-2's: fc1 widens, fc2 narrows) whose last expert gets
    no token: positive inputs score it far below the others."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(HIDDEN, INTERMEDIATE), nn.GELU(), nn.Linear(INTERMEDIATE, HIDDEN))
    layer = SparseMoE(mlp, HIDDEN, num_experts=EXPERTS, top_k=2).double()
    with torch.no_grad():
        layer.router.weight.normal_(std=0.5)
        layer.router.weight[-1] = -10.0
        for parameter in layer.experts.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return layer


@pytest.mark.parametrize("gradient", ["exact", "output"])
def test_biased_experts_and_an_idle_one_match_brute_force(gradient) -> None:
    layer = _biased_layer()
    probe = SparseMoEProbe("moe", layer)
    probe.start(True, ("exact", "output"))
    generator = torch.Generator().manual_seed(1)
    inputs = torch.rand(3, 10, HIDDEN, generator=generator, dtype=torch.float64) + 0.1  # (B, T, H)
    target = torch.randn(3, 10, HIDDEN, generator=generator, dtype=torch.float64)  # ∂L/∂y
    (layer(inputs) * target).sum().backward()
    conflicts = probe.conflicts(gradient)
    record = layer.last_routing
    assert record.expert_rows[-1].numel() == 0  # the idle expert
    worst = 0.0
    for expert in range(EXPERTS):
        module = expert_mlp(layer.experts, expert)  # a dense copy: the brute force runs it token by token
        params = {key: value.detach() for key, value in module.named_parameters()}
        rows, per_token = token_gradients(
            lambda p, x, m=module: functional_call(m, p, (x,)),
            params,
            inputs.reshape(-1, HIDDEN),
            target.reshape(-1, HIDDEN),
            record.topk_index,
            record.topk_weight.double(),
            expert,
            gradient,
        )
        expected = torch.nn.functional.cosine_similarity(per_token, per_token.sum(0, keepdim=True), dim=1)
        mine = conflicts.expert == expert
        order = torch.argsort(conflicts.rows[mine])
        assert torch.equal(conflicts.rows[mine][order], rows)
        if rows.numel():
            worst = max(worst, (conflicts.cosine[mine][order] - expected).abs().max().item())
    assert conflicts.cosine.numel() == record.groups.row_experts.numel()
    assert worst <= 1e-6, worst
    probe.remove()


def test_sparse_moe_hooks_launch_as_many_operators_at_any_number_of_experts() -> None:
    """One site per fused linear (gate, up and down of an upcycled Qwen2) and one for the experts' output,
    each taking every expert's rows at once: the operators of STGC's hooks per MoE layer are the same at 4
    and at 64 experts (they were 124 and 1,984 with one module per expert)."""
    hooks = {
        experts: layer_operators(method_profile(tiny_sparse_moe(experts))["parts"], 2)["hooks"]
        for experts in (4, 64)
    }
    assert hooks[4] == hooks[64] and hooks[4] < 40, hooks  # 31: 3 sites of ~10 operators, and the output
