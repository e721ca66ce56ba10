"""The study's control: `STGC(selection="random")` applies the CEL to as many random assignments as the
gradient flags, and leaves everything else as STGC does."""

import math
from functools import partial

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from stgc.callback import STGC
from stgc.method.loss import conflict_elimination_loss
from stgc.method.selection import random_like
from support.lightning_models import CausalLMModule, cpu_trainer, upcycled_qwen2

_trainer = partial(cpu_trainer, max_steps=1)


def test_random_like_draws_as_many_eligible_assignments_uniformly() -> None:
    eligible = torch.tensor([True, True, False, True, True, False, True, True])  # 6 eligible
    flagged = torch.tensor([True, False, False, False, True, False, False, False])  # 2 flagged
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([random_like(flagged, eligible, generator) for _ in range(3000)])  # (3000, 8)
    assert (draws.sum(1) == 2).all()
    assert not draws[:, ~eligible].any()
    frequency = draws[:, eligible].double().mean(0)  # each eligible one: 2/6
    tolerance = 5 * math.sqrt((1 / 3) * (2 / 3) / 3000)  # five binomial standard deviations
    assert torch.allclose(frequency, torch.full_like(frequency, 1 / 3), atol=tolerance)


def test_random_like_with_nothing_flagged_draws_nothing() -> None:
    eligible = torch.ones(5, dtype=torch.bool)
    assert not random_like(torch.zeros(5, dtype=torch.bool), eligible, torch.Generator()).any()


class Recording(STGC):
    """STGC that keeps, per layer, what it flagged, what the CEL applied to and the router inputs."""

    def __init__(self, **kwargs) -> None:
        super().__init__(threshold=0.0, histogram_every_n_steps=0, **kwargs)
        self.steps: list[dict] = []
        select = self.method._select

        def recording(layers, conflicting):
            penalised = select(layers, conflicting)
            probes = self.method.probes
            self.steps.append(
                {
                    "layers": layers,
                    "conflicting": [m.clone() for m in conflicting],
                    "penalised": [m.clone() for m in penalised],
                    "router_inputs": [p.routing().router_input.detach().clone() for p in probes],
                    "routers": [p.router_weight for p in probes],
                    "lm_grads": [p.router_weight.grad.clone() for p in probes],
                }
            )
            return penalised

        self.method._select = recording


def _fit(seed: int = 0, **kwargs) -> tuple[Recording, CausalLMModule, dict]:
    callback = Recording(**kwargs)
    module = CausalLMModule(upcycled_qwen2(), lr=0.0)  # no step: the routers' grads stay readable
    torch.manual_seed(seed)  # what seed_everything does; the draws start from torch.initial_seed()
    trainer = _trainer([callback])
    trainer.fit(module)
    return callback, module, trainer.callback_metrics


def test_random_selection_applies_the_cel_to_as_many_random_eligible_assignments() -> None:
    callback, module, _ = _fit(selection="random", loss_weight=0.5, loss_type="unlikelihood")
    (step,) = callback.steps
    for index, (layer, flagged, penalised) in enumerate(
        zip(step["layers"], step["conflicting"], step["penalised"], strict=True)
    ):
        assert int(flagged.sum()) > 0
        assert int(penalised.sum()) == int(flagged.sum())
        assert not (penalised & ~layer.has_grad).any()
        assert not torch.equal(penalised, flagged)
        router = step["routers"][index]  # lr = 0: what the CEL's gradient was computed at
        weight = router.detach().clone().requires_grad_(True)
        logits = step["router_inputs"][index].float() @ weight.T
        cel = conflict_elimination_loss(logits, layer.rows, layer.expert, "unlikelihood", penalised)
        (expected,) = torch.autograd.grad(0.5 * cel, weight)
        torch.testing.assert_close(router.grad - step["lm_grads"][index], expected)


def test_logged_conflicts_are_the_gradients_whatever_the_selection() -> None:
    _, _, random_metrics = _fit(selection="random")
    _, _, gradient_metrics = _fit(selection="gradient")
    names = [name for name in gradient_metrics if name.startswith("stgc/conflict_ratio/")]
    assert names
    for name in names:
        assert float(random_metrics[name]) == float(gradient_metrics[name])


def test_random_draws_follow_the_seed() -> None:
    first, second, other = (_fit(seed, selection="random")[0].steps[0]["penalised"] for seed in (0, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(a, c) for a, c in zip(first, other, strict=True))


def test_unknown_selection_is_refused() -> None:
    with pytest.raises(MisconfigurationException, match="selection"):
        STGC(selection="worst")
