"""The conflict elimination loss against direct formulas."""

import pytest
import torch

from stgc.method.loss import conflict_elimination_loss, conflict_elimination_losses


def test_unlikelihood_is_minus_log_one_minus_p_over_pairs() -> None:
    logits = torch.randn(5, 4, dtype=torch.float64)
    rows, experts = torch.tensor([0, 0, 3]), torch.tensor([1, 2, 0])
    p = logits.softmax(-1)
    expected = -torch.log(1 - p[rows, experts]).mean()
    torch.testing.assert_close(conflict_elimination_loss(logits, rows, experts, "unlikelihood"), expected)


def test_unlikelihood_is_finite_for_a_near_certain_expert() -> None:
    logits = torch.tensor([[60.0, 0.0, 0.0]])
    loss = conflict_elimination_loss(logits, torch.tensor([0]), torch.tensor([0]), "unlikelihood")
    assert torch.isfinite(loss) and loss > 50


def test_negated_logits_is_cross_entropy_to_the_flipped_distribution_per_token() -> None:
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    rows, experts = torch.tensor([0, 0, 3]), torch.tensor([1, 2, 0])  # token 0 conflicts twice, counted once
    loss = conflict_elimination_loss(logits, rows, experts, "negated_logits")
    z = logits[[0, 3]]
    expected = -(torch.softmax(-z, -1).detach() * torch.log_softmax(z, -1)).sum(-1).mean()
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad[[1, 2, 4]].abs().sum() == 0  # only conflicting tokens' logits move
    top = logits[0].argmax()
    assert grad[0, top] > 0  # descending the loss lowers the top expert's logit


def test_unknown_loss_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="loss_type='kl'"):
        conflict_elimination_loss(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([0]), "kl")


def test_negated_logits_per_expert_is_minus_log_softmax_of_negated_logits_over_e_times_n() -> None:
    logits = torch.randn(5, 4, dtype=torch.float64)
    rows, experts = torch.tensor([0, 0, 3]), torch.tensor([1, 2, 0])
    flipped = torch.softmax(-logits, -1)
    expected = -torch.log(flipped[rows, experts]).sum() / (4 * 5)
    loss = conflict_elimination_loss(logits, rows, experts, "negated_logits_per_expert")
    torch.testing.assert_close(loss, expected)
    flagged = torch.tensor([True, False, True])  # a mask drops a pair, the denominator stays E·N
    masked = conflict_elimination_loss(logits, rows, experts, "negated_logits_per_expert", flagged)
    torch.testing.assert_close(masked, -torch.log(flipped[[0, 3], [1, 0]]).sum() / 20)


# One token per case, its router input a unit vector: one SGD step on the router weight W (E, H)
# moves the logits by exactly -lr * dL/dz. (logits, conflicting expert e)
CONFIDENT = [3.0, 2.0, -1.0, -2.0]
NEAR_UNIFORM = [0.1, 0.05, -0.05, -0.1]
CASES = {
    "first_choice": (CONFIDENT, 0),
    "second_choice": (CONFIDENT, 1),
    "near_uniform_second_choice": (NEAR_UNIFORM, 1),
}
# What a step does to p_{t,e}: the expert-specific forms lower it in every case; negated_logits lowers
# the token's first choice and, pushing hardest there, raises a confident router's second choice.
LOWERS = {
    "negated_logits": {"first_choice": True, "second_choice": False, "near_uniform_second_choice": True},
    "negated_logits_per_expert": dict.fromkeys(CASES, True),
    "unlikelihood": dict.fromkeys(CASES, True),
}


def p_after_one_router_step(logits: list[float], expert: int, loss_type: str, lr: float = 0.5):
    """p_{t,e} before and after one plain SGD step of the CEL on the router weight alone."""
    num_experts = len(logits)
    router_input = torch.zeros(1, 8, dtype=torch.float64)
    router_input[0, 0] = 1.0
    weight = torch.zeros(num_experts, 8, dtype=torch.float64)
    weight[:, 0] = torch.tensor(logits, dtype=torch.float64)
    weight.requires_grad_()
    rows, experts = torch.tensor([0]), torch.tensor([expert])
    loss = conflict_elimination_loss(router_input @ weight.T, rows, experts, loss_type)
    (grad,) = torch.autograd.grad(loss, weight)
    with torch.no_grad():
        before = (router_input @ weight.T).softmax(-1)[0, expert]
        after = (router_input @ (weight - lr * grad).T).softmax(-1)[0, expert]
    return float(before), float(after)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("loss_type", LOWERS)
def test_one_router_step_moves_the_conflicting_experts_probability_as_stated(loss_type, case) -> None:
    before, after = p_after_one_router_step(*CASES[case], loss_type)
    assert (after < before) == LOWERS[loss_type][case], (before, after)


@pytest.mark.parametrize("loss_type", ["negated_logits_per_expert", "unlikelihood"])
def test_the_expert_specific_forms_lower_p_te_for_any_logits_and_step(loss_type) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        scale = float(torch.empty(1).uniform_(0.05, 3.0, generator=generator))
        logits = (torch.randn(4, generator=generator) * scale).tolist()
        expert = int(torch.randint(4, (1,), generator=generator))
        lr = float(torch.empty(1).uniform_(0.01, 5.0, generator=generator))
        before, after = p_after_one_router_step(logits, expert, loss_type, lr)
        assert after < before, (logits, expert, lr)


def test_sigmoid_forms_against_their_direct_formulas() -> None:
    logits = torch.randn(5, 4, dtype=torch.float64)
    rows, experts = torch.tensor([0, 0, 3]), torch.tensor([1, 2, 0])
    s = logits.sigmoid()
    unlikelihood = -torch.log(1 - s[rows, experts]).mean()
    per_expert = -torch.log(torch.sigmoid(-logits[rows, experts])).sum() / (4 * 5)
    q = torch.sigmoid(-logits[[0, 3]])  # the flagged tokens' targets
    negated = -(q * torch.log(s[[0, 3]]) + (1 - q) * torch.log(1 - s[[0, 3]])).sum(-1).mean()
    for loss_type, expected in (("unlikelihood", unlikelihood), ("negated_logits_per_expert", per_expert),
                                ("negated_logits", negated)):  # fmt: skip
        got = conflict_elimination_loss(logits, rows, experts, loss_type, scores="sigmoid")
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("loss_type", ["unlikelihood", "negated_logits_per_expert"])
def test_sigmoid_forms_move_only_the_conflicting_experts_logit_down(loss_type) -> None:
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    rows, experts = torch.tensor([1, 4]), torch.tensor([3, 0])
    conflict_elimination_loss(logits, rows, experts, loss_type, scores="sigmoid").backward()
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[rows, experts] = True
    assert (logits.grad[mask] > 0).all() and (logits.grad[~mask] == 0).all()


def _direct(logits, rows, experts, flagged, loss_type: str, scores: str) -> torch.Tensor:
    """One layer's CEL from its formula (the module docstring), on the flagged pairs only."""
    rows, experts = rows[flagged], experts[flagged]
    num_tokens, num_experts = logits.shape
    if loss_type == "negated_logits":
        z = logits[rows.unique()]
        if scores == "sigmoid":
            q, s = torch.sigmoid(-z).detach(), torch.sigmoid(z)  # the target: stopgrad
            return -(q * s.log() + (1 - q) * (1 - s).log()).sum(-1).mean() if len(z) else z.sum()
        return (
            -(torch.softmax(-z, -1).detach() * torch.log_softmax(z, -1)).sum(-1).mean() if len(z) else z.sum()
        )
    score = logits.sigmoid() if scores == "sigmoid" else logits.softmax(-1)
    if loss_type == "negated_logits_per_expert":
        if scores == "sigmoid":
            return -torch.log(1 - score[rows, experts]).sum() / (num_experts * num_tokens)
        return -torch.log(torch.softmax(-logits, -1)[rows, experts]).sum() / (num_experts * num_tokens)
    chosen = -torch.log(1 - score[rows, experts])
    return chosen.mean() if len(chosen) else chosen.sum()


@pytest.mark.parametrize("scores", ["softmax", "sigmoid"])
@pytest.mark.parametrize("loss_type", ["negated_logits", "negated_logits_per_expert", "unlikelihood"])
def test_the_layers_cel_in_one_pass_is_each_layers_own(loss_type, scores) -> None:
    """Layers of different token counts, one with nothing flagged: each value is its own layer's formula,
    and the gradient reaches each layer's logits as that layer's own loss sends it."""
    generator = torch.Generator().manual_seed(0)
    layers = []
    for num_tokens, num_pairs, share in ((7, 10, 0.5), (3, 4, 0.0), (11, 15, 0.7)):
        logits = torch.randn(num_tokens, 5, dtype=torch.float64, generator=generator).requires_grad_()
        rows = torch.randint(num_tokens, (num_pairs,), generator=generator)
        experts = torch.randint(5, (num_pairs,), generator=generator)
        flagged = torch.rand(num_pairs, generator=generator) < share
        layers.append((logits, rows, experts, flagged))
    logits, rows, experts, flagged = zip(*layers, strict=True)
    losses = conflict_elimination_losses(logits, rows, experts, loss_type, flagged, scores)
    expected = torch.stack([_direct(*layer, loss_type, scores) for layer in layers])
    torch.testing.assert_close(losses, expected)
    assert losses[1] == 0
    grads = torch.autograd.grad(losses.sum(), logits)
    for layer_logits, grad, want in zip(logits, grads, expected, strict=True):
        (own,) = torch.autograd.grad(want, layer_logits, allow_unused=True, materialize_grads=True)
        torch.testing.assert_close(grad, own)


def test_unlikelihoods_gradient_is_exact_for_near_certain_experts() -> None:
    """float32 logits whose top expert is all but certain (1 - p = e^-58): the loss and its closed-form
    gradient against autograd, in float64, of logsumexp(z) - logsumexp(z without e), pair by pair."""
    logits = torch.tensor([[60.0, 0.0, -1.0, 2.0], [0.5, 0.4, -3.0, 0.0], [-2.0, 30.0, 29.0, 1.0]])
    rows, experts = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 3, 1, 1, 2, 0])
    flagged = torch.tensor([True, True, True, True, True, False])
    z = logits.double().requires_grad_()
    terms = []
    for t, e in zip(rows[flagged].tolist(), experts[flagged].tolist(), strict=True):
        others = torch.cat([z[t, :e], z[t, e + 1 :]])
        terms.append(torch.logsumexp(z[t], 0) - torch.logsumexp(others, 0))
    expected = torch.stack(terms).mean()
    (expected_grad,) = torch.autograd.grad(expected, z)
    leaf = logits.clone().requires_grad_()
    loss = conflict_elimination_loss(leaf, rows, experts, "unlikelihood", flagged)
    (grad,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-7)
