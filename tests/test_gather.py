"""SparseMoE's experts in one pass (stgc.method.gather): exact cosines for biased experts and an expert
without tokens, rows joined without copies, and hooks whose only operators per expert are those of its
product with its own G."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from stgc.method import gather
from stgc.method.gather import rows_of
from stgc.method.probes import SparseMoEProbe
from stgc.moe import SparseMoE
from stgc_experiments.bench import layer_operators, method_profile, tiny_sparse_moe
from support.brute_force import token_gradients

HIDDEN, INTERMEDIATE, EXPERTS = 6, 16, 4


def test_rows_of_views_adjacent_blocks_and_copies_others() -> None:
    whole = torch.randn(7, 3)
    blocks = whole.split([2, 0, 5])
    joined = rows_of(blocks)
    assert joined.data_ptr() == whole.data_ptr() and torch.equal(joined, whole)  # no copy
    separate = [torch.randn(2, 3), torch.randn(4, 3)]
    assert torch.equal(rows_of(separate), torch.cat(separate))
    shuffled = [blocks[2], blocks[0]]  # one storage, out of order
    assert torch.equal(rows_of(shuffled), torch.cat(shuffled))
    columns = whole.T.contiguous().T.split([3, 4])  # one storage, but column-major
    assert torch.equal(rows_of(columns), whole)


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
def test_biased_experts_and_an_idle_one_match_brute_force(gradient, monkeypatch) -> None:
    finished = []
    for name in ("LinearGather", "OutputGather"):  # count the one-pass finishes
        kind = getattr(gather, name)
        monkeypatch.setattr(kind, "finish", lambda self, f=kind.finish: finished.append(self) or f(self))
    layer = _biased_layer()
    probe = SparseMoEProbe("moe", layer)
    probe.start(True, ("exact", "output"))
    generator = torch.Generator().manual_seed(1)
    inputs = torch.rand(3, 10, HIDDEN, generator=generator, dtype=torch.float64) + 0.1  # (B, T, H)
    target = torch.randn(3, 10, HIDDEN, generator=generator, dtype=torch.float64)  # ∂L/∂y
    (layer(inputs) * target).sum().backward()
    conflicts = probe.conflicts(gradient)
    assert len(finished) == 3  # output, fc1, fc2: every expert at once
    record = layer.last_routing
    assert record.expert_rows[-1].numel() == 0  # the idle expert
    worst = 0.0
    for expert, module in enumerate(layer.experts):
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
    assert conflicts.cosine.numel() == record.row_experts.numel()
    assert worst <= 1e-6, worst
    assert not finished[3:]  # the brute force ran the experts outside their layer: nothing captured
    probe.remove()


def test_sparse_moe_hooks_add_only_each_experts_product_with_its_g() -> None:
    """Per expert and linear, its product with its G, that product's dot with the narrower side, and the
    wider side's norms; every other operator of the hooks is once per layer (upcycled Qwen2: gate, up and
    down per expert)."""
    hooks = {
        experts: layer_operators(method_profile(tiny_sparse_moe(experts))["parts"], 2)["hooks"]
        for experts in (4, 16)
    }
    assert hooks[16] - hooks[4] == 3 * 3 * (16 - 4)
    assert hooks[4] < 3 * 3 * 4 + 40  # was 124 with every expert's terms on their own
