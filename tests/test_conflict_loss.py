"""The conflict elimination loss against direct formulas."""

import pytest
import torch

from stgc.conflict.loss import conflict_elimination_loss


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
