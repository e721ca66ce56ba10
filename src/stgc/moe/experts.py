"""A dense MLP's E expert copies as one module: the MLP itself, each of its nn.Linear layers replaced by an
ExpertLinear that holds all experts' weights fused, (E, d_out, d_in), and multiplies every expert's rows
at once (grouped_mm), as transformers' fused experts do. The MLP's own forward runs once per layer on
all routed rows, sorted by expert, so the layer's operators (and STGC's hooks, one per fused weight) do
not grow with the number of experts.

Notation: E experts, S rows of all experts sorted by expert (Groups).
"""

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from stgc.moe.grouped import Groups, grouped_linear


class ExpertLinear(nn.Module):
    """E experts' copies of one nn.Linear: weight (E, d_out, d_in), bias (E, d_out) or None. Its input is
    every expert's rows sorted by expert, as the `groups` its layer sets for one forward say."""

    def __init__(self, linear: nn.Linear, num_experts: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().expand(num_experts, -1, -1).clone())
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().expand(num_experts, -1).clone())
        self.groups: Groups | None = None  # set by the layer for the duration of one forward

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.weight.shape[0]}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )

    def expert_linear(self, expert: int) -> nn.Linear:
        """Expert `expert`'s copy of the linear, as an nn.Linear of its own (a copy of the weights)."""
        weight = self.weight[expert]
        linear = nn.Linear(
            *weight.shape[::-1], bias=self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias[expert])
        return linear

    def forward(self, x: Tensor) -> Tensor:
        """(S, d_in) -> (S, d_out): each row times its own expert's weight (plus its bias)."""
        if self.groups is None:
            raise RuntimeError(
                "ExpertLinear multiplies rows sorted by expert: call it inside its SparseMoE's forward "
                "(stgc.moe.experts.expert_mlp gives one expert as a dense module)"
            )
        return grouped_linear(x, self.weight.mT, self.bias, self.groups)


def fused_experts(mlp: nn.Module, num_experts: int) -> nn.Module:
    """A copy of `mlp` whose nn.Linear layers hold `num_experts` fused copies of their weights (upcycling:
    every expert starts as the dense MLP). ValueError for an MLP with parameters outside nn.Linear."""
    outside = [
        name
        for name, _ in mlp.named_parameters()
        if not isinstance(mlp.get_submodule(name.rpartition(".")[0]), nn.Linear)
    ]
    if outside:
        raise ValueError(
            f"SparseMoE upcycles MLPs made of nn.Linear layers; {type(mlp).__name__} has parameters "
            f"outside one: {outside}"
        )
    experts = copy.deepcopy(mlp)
    for parent in list(experts.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, ExpertLinear(child, num_experts))
    return experts


def expert_linears(experts: nn.Module) -> list[ExpertLinear]:
    """The fused linears of a `fused_experts` module, in module order."""
    return [module for module in experts.modules() if isinstance(module, ExpertLinear)]


@contextmanager
def grouped(experts: nn.Module, groups: Groups) -> Iterator[None]:
    """Let the fused linears of `experts` know where each expert's rows are, for one forward."""
    linears = expert_linears(experts)
    for linear in linears:
        linear.groups = groups
    try:
        yield
    finally:
        for linear in linears:
            linear.groups = None


def expert_mlp(experts: nn.Module, expert: int) -> nn.Module:
    """Expert `expert` of a `fused_experts` module as a dense MLP of nn.Linear layers (a copy of its
    weights, without the hooks on `experts`): for analysis and for brute-force checks."""
    memo: dict[int, object] = {id(p): None for p in experts.parameters()}  # the fused ones are replaced
    for module in experts.modules():  # hooks (a probe's) stay behind: empty dicts in their place
        memo.update(
            {id(v): type(v)() for k, v in vars(module).items() if "hooks" in k and isinstance(v, dict)}
        )
    dense = copy.deepcopy(experts, memo)
    for name, fused in experts.named_modules():
        if isinstance(fused, ExpertLinear):
            dense.set_submodule(name, fused.expert_linear(expert))
    return dense


def stack_expert_state(state_dict: dict, prefix: str, num_experts: int) -> None:
    """Turn a checkpoint's per-expert entries (`<prefix>experts.<e>.<name>`, one module per expert, as this
    project saved SparseMoE before its experts were fused) into fused ones (`<prefix>experts.<name>`), in
    place; a checkpoint of fused experts is left as it is."""
    head = f"{prefix}experts."
    names = {key[len(head) :].split(".", 1)[1] for key in state_dict if key.startswith(head + "0.")}
    for name in names:
        keys = [f"{head}{e}.{name}" for e in range(num_experts)]
        missing = [key for key in keys if key not in state_dict]
        if missing:
            raise ValueError(f"a checkpoint of per-expert weights lacks {missing}")
        state_dict[head + name] = torch.stack([state_dict.pop(key) for key in keys])
