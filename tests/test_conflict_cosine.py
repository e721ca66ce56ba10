"""Exact token-gradient cosines against per-token gradients materialised with torch.func."""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from stgc.method.cosine import cosine_from_terms, linear_gradient_terms, token_gradient_cosine

HIDDEN, INTERMEDIATE = 16, 32  # auto path: Gram below ~21-26 tokens per layer, GEMM above


class SwiGLUExpert(nn.Module):
    """LLaMA-style expert: down(silu(gate x) * up x)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.up = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.down = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GELUExpert(nn.Module):
    """Biased two-layer expert: fc2(gelu(fc1 x))."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(HIDDEN, INTERMEDIATE)
        self.fc2 = nn.Linear(INTERMEDIATE, HIDDEN)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class FusedSwiGLUExpert(nn.Module):
    """SwiGLU expert whose gate and up projections are one (2I, H) linear, split after the product."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up = nn.Linear(HIDDEN, 2 * INTERMEDIATE, bias=False)
        self.down = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (..., I) each
        return self.down(F.silu(gate) * up)


EXPERTS = [SwiGLUExpert, GELUExpert, FusedSwiGLUExpert]


def _linears(expert: nn.Module) -> list[nn.Linear]:
    """The expert's linear layers in forward order (definition order, for these experts)."""
    return [m for m in expert.modules() if isinstance(m, nn.Linear)]


def _loss(expert: nn.Module, x: Tensor, weights: Tensor, targets: Tensor) -> Tensor:
    """Σ_i w_i ⟨expert(x_i), r_i⟩: routing weight w_i scales the output, random r_i gives realistic δ."""
    return (weights[:, None] * expert(x) * targets).sum()


def _capture(
    expert: nn.Module, x: Tensor, weights: Tensor, targets: Tensor
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Each linear's inputs X, output grads Δ, and summed parameter grads, from one forward and backward."""
    inputs, outputs = [], []

    def keep(_module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        inputs.append(args[0].detach())
        outputs.append(out)

    hooks = [m.register_forward_hook(keep) for m in _linears(expert)]
    loss = _loss(expert, x, weights, targets)
    for hook in hooks:
        hook.remove()
    params = list(expert.parameters())
    grads = torch.autograd.grad(loss, outputs + params)
    return inputs, list(grads[: len(outputs)]), list(grads[len(outputs) :])


def _per_token_grads(expert: nn.Module, x: Tensor, weights: Tensor, targets: Tensor) -> Tensor:
    """Materialised per-token gradients (n, n_params) of all the expert's parameters."""
    params = {name: p.detach() for name, p in expert.named_parameters()}

    def token_loss(p: dict[str, Tensor], x_i: Tensor, w_i: Tensor, r_i: Tensor) -> Tensor:
        return w_i * (functional_call(expert, p, (x_i,)) * r_i).sum()

    grads = vmap(grad(token_loss), in_dims=(None, 0, 0, 0))(params, x, weights, targets)
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)  # (n, n_params)


def _brute_force_cosine(per_token: Tensor) -> Tensor:
    """cos(g_i, Σ_j g_j) (n,) from materialised gradients."""
    return F.cosine_similarity(per_token, per_token.sum(0, keepdim=True), dim=1)


def _batch(n: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Float64 token inputs (n, H), routing weights (n,) and loss targets (n, H)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, HIDDEN, generator=gen, dtype=torch.float64)
    weights = torch.rand(n, generator=gen, dtype=torch.float64)
    targets = torch.randn(n, HIDDEN, generator=gen, dtype=torch.float64)
    return x, weights, targets


def _expert(cls: type[nn.Module]) -> nn.Module:
    """A float64 expert with fixed random weights (biases too)."""
    torch.manual_seed(0)
    expert = cls().double()
    for p in expert.parameters():
        nn.init.normal_(p, std=0.3)
    return expert


def _has_bias(expert: nn.Module) -> list[bool]:
    """One bias flag per linear, in forward order."""
    return [m.bias is not None for m in _linears(expert)]


@pytest.mark.parametrize("n", [4, 40])
@pytest.mark.parametrize("path", ["auto", "gram", "gemm"])
@pytest.mark.parametrize("cls", EXPERTS)
def test_matches_brute_force(cls: type[nn.Module], path: str, n: int) -> None:
    expert = _expert(cls)
    batch = _batch(n)
    inputs, deltas, _ = _capture(expert, *batch)
    cos = token_gradient_cosine(inputs, deltas, has_bias=_has_bias(expert), path=path)
    expected = _brute_force_cosine(_per_token_grads(expert, *batch))
    assert cos.dtype == torch.float64
    torch.testing.assert_close(cos, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", EXPERTS)
def test_given_summed_gradients(cls: type[nn.Module]) -> None:
    expert = _expert(cls)
    batch = _batch(12)
    inputs, deltas, param_grads = _capture(expert, *batch)
    grads = iter(param_grads)  # parameters() yields weight then bias, layer by layer
    terms = []
    for x, delta, linear in zip(inputs, deltas, _linears(expert), strict=True):
        grad_weight = next(grads)
        grad_bias = next(grads) if linear.bias is not None else None
        terms.append(linear_gradient_terms(x, delta, grad_weight=grad_weight, grad_bias=grad_bias))
    dots, sqnorms, totals = (sum(t) for t in zip(*terms, strict=True))
    expected = _brute_force_cosine(_per_token_grads(expert, *batch))
    torch.testing.assert_close(cosine_from_terms(dots, sqnorms, totals), expected, rtol=0, atol=1e-6)


def test_given_grad_weight_is_used_not_recomputed() -> None:
    x, delta = torch.randn(3, 5), torch.randn(3, 4)
    dot, sqnorm, total = linear_gradient_terms(x, delta, grad_weight=torch.zeros(4, 5))
    assert torch.equal(dot, torch.zeros(3)) and total == 0
    torch.testing.assert_close(sqnorm, delta.square().sum(1) * x.square().sum(1))


@pytest.mark.parametrize("path", ["gram", "gemm"])
def test_zero_gradient_tokens_get_zero(path: str) -> None:
    expert = _expert(GELUExpert)
    x, weights, targets = _batch(6)
    weights[[1, 4]] = 0.0  # routed with zero weight: no gradient
    inputs, deltas, _ = _capture(expert, x, weights, targets)
    cos = token_gradient_cosine(inputs, deltas, has_bias=True, path=path)
    assert cos[1] == 0.0 and cos[4] == 0.0
    torch.testing.assert_close(cos, _brute_force_cosine(_per_token_grads(expert, x, weights, targets)))


@pytest.mark.parametrize("path", ["gram", "gemm"])
def test_zero_summed_gradient_gives_all_zero(path: str) -> None:
    x = torch.randn(1, 5).expand(2, 5)  # (2, 5)  one input seen twice
    delta = torch.randn(1, 4) * torch.tensor([[1.0], [-1.0]])  # (2, 4)  opposite output grads
    assert torch.equal(token_gradient_cosine([x], [delta], path=path), torch.zeros(2))


@pytest.mark.parametrize("path", ["gram", "gemm"])
def test_opposite_groups(path: str) -> None:
    expert = _expert(SwiGLUExpert)
    x, weights, targets = _batch(1)
    sign = torch.tensor([1.0] * 5 + [-1.0] * 3, dtype=torch.float64)  # majority +, minority −
    batch = (x.expand(8, -1), weights.expand(8), sign[:, None] * targets)
    inputs, deltas, _ = _capture(expert, *batch)
    torch.testing.assert_close(token_gradient_cosine(inputs, deltas, path=path), sign)


def test_no_tokens_gives_empty() -> None:
    cos = token_gradient_cosine(
        [torch.empty(0, 5), torch.empty(0, 4)], [torch.empty(0, 4), torch.empty(0, 5)]
    )
    assert cos.shape == (0,) and cos.dtype == torch.float32


@pytest.mark.parametrize("tokens", [16, 512])  # the Gram path, then the GEMM path
def test_bfloat16_terms_are_float32_and_within_their_stated_tolerance_of_float64(tokens) -> None:
    """bf16 captures (an expert under bf16 autocast) keep their products in bf16 and sum in fp32;
    tokens that agree (70%) or disagree with a shared direction give cosines across [-0.8, 0.8]."""
    torch.manual_seed(0)
    sign = torch.where(torch.rand(tokens, 1) < 0.7, 1.0, -1.0)  # (n, 1)

    def linear(d_in: int, d_out: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(1, d_in) + 0.5 * torch.randn(tokens, d_in)
        delta = 1e-3 * (sign * torch.randn(1, d_out) + 0.5 * torch.randn(tokens, d_out))
        return x.bfloat16(), delta.bfloat16()

    xs, deltas = zip(linear(96, 256), linear(96, 256), linear(256, 96), strict=True)
    cos = token_gradient_cosine(xs, deltas)
    assert cos.dtype == torch.float32
    exact = token_gradient_cosine([x.double() for x in xs], [d.double() for d in deltas])
    assert exact.min() < -0.5 and exact.max() > 0.5
    assert (cos.double() - exact).abs().max() <= 5e-3


@pytest.mark.parametrize(
    ("inputs", "output_grads", "has_bias", "match"),
    [
        ([torch.ones(3, 5)], [], False, "1 layer inputs but 0 output grads"),
        ([], [], False, "at least one linear layer"),
        ([torch.ones(3, 5)] * 2, [torch.ones(3, 4)] * 2, [True], "1 flags for 2 layers"),
        ([torch.ones(3, 5), torch.ones(2, 5)], [torch.ones(3, 4)] * 2, False, r"layer 1: inputs \(2, 5\)"),
        (
            [torch.ones(3, 5)] * 2,
            [torch.ones(3, 4), torch.ones(2, 4)],
            False,
            r"layer 1: .*\(3, 5\).*\(2, 4\)",
        ),
        ([torch.ones(3, 5)], [torch.ones(3)], False, r"layer 0: .*\(3, 5\).*\(3,\)"),
    ],
)
def test_shape_errors(inputs: list[Tensor], output_grads: list[Tensor], has_bias: bool, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        token_gradient_cosine(inputs, output_grads, has_bias=has_bias)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grad_weight": torch.ones(5, 4)}, r"grad_weight \(5, 4\) must be .* \(4, 5\)"),
        ({"grad_bias": torch.ones(5)}, r"grad_bias \(5,\) must be .* \(4,\)"),
        ({"path": "fast"}, "path must be one of"),
    ],
)
def test_linear_argument_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        linear_gradient_terms(torch.ones(3, 5), torch.ones(3, 4), **kwargs)
