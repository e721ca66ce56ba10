"""Each router family's rule (stgc.method.routers) against the router's own forward: the rule picks the
router's experts, and one CEL step lowers the conflicting expert's routing weight as that router computes
it, on tiny random models of transformers' MoE VLM families."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from stgc import STGC
from stgc.constants import MODALITIES
from stgc.method import find_moe_probes
from stgc.method.hf_experts import restore_experts, use_stgc_experts
from stgc.method.loss import conflict_elimination_loss
from stgc.method.routers import SOFTMAX
from support.lightning_models import CausalLMModule, cpu_trainer
from support.moe_vlms import FAMILIES, IMAGE, routed, router_of


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    builder, scores, biased = FAMILIES[request.param]
    torch.manual_seed(0)
    model = builder().eval()
    return request.param, model, find_moe_probes(model), scores, biased


def tokens_for(probe, count: int = 64) -> torch.Tensor:
    return torch.randn(count, probe.router_weight.shape[1], generator=torch.Generator().manual_seed(1))


@contextmanager
def capturing(
    model: torch.nn.Module, probes: list, gradients: tuple[str, ...] = ("exact",)
) -> Iterator[None]:
    """The probes capture and the model runs STGC's experts; afterwards the probes are removed and the
    model's own experts implementation restored."""
    previous = use_stgc_experts(model)
    try:
        for probe in probes:
            probe.start(capturing=True, gradients=gradients)
        yield
    finally:
        for probe in probes:
            probe.start(False)
            probe.remove()
        restore_experts(previous)


def logits_and_grads(
    model: torch.nn.Module, ids: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The LM loss's logits and every parameter's gradient on `ids`."""
    model.zero_grad()
    output = model(input_ids=ids, labels=ids)
    output.loss.backward()
    return output.logits.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def assert_same_logits_and_grads(ours: tuple, reference: tuple) -> None:
    torch.testing.assert_close(ours[0], reference[0])
    assert ours[1].keys() == reference[1].keys()
    for name, grad in reference[1].items():
        torch.testing.assert_close(ours[1][name], grad, msg=name)


def test_the_rule_picks_the_routers_own_experts(family) -> None:
    name, model, probes, scores, biased = family
    assert probes, name
    for probe in probes:
        assert probe.rule.scores == scores and (probe.rule.bias_owner is not None) == biased, name
        tokens = tokens_for(probe)
        _, chosen = routed(router_of(model, probe.router_weight), tokens)
        ours = probe.rule.choose(probe.router_logits(tokens), probe.top_k)
        assert torch.equal(ours.sort(-1).values, chosen.sort(-1).values), name


@pytest.mark.parametrize("loss_type", ["unlikelihood", "negated_logits_per_expert"])
def test_a_cel_step_lowers_the_conflicting_experts_weight_under_the_routers_rule(family, loss_type) -> None:
    name, model, probes, scores, _ = family
    probe = probes[0]
    router = router_of(model, probe.router_weight)
    tokens = tokens_for(probe, 16)
    weights, chosen = routed(router, tokens)
    original = probe.router_weight.detach().clone()
    for token in range(tokens.shape[0]):
        for slot in range(probe.top_k):
            expert = chosen[token, slot]
            logits = probe.router_logits(tokens[token : token + 1])  # (1, E), differentiable in the weight
            loss = conflict_elimination_loss(
                logits, torch.tensor([0]), expert[None], loss_type, scores=probe.rule.scores
            )
            (grad,) = torch.autograd.grad(loss, probe.router_weight)
            with torch.no_grad():
                probe.router_weight -= 0.5 * grad / grad.norm()
                after_weights, after_chosen = routed(router, tokens[token : token + 1])
                kept = after_chosen[0] == expert
                after = after_weights[0][kept].sum()  # 0 when the expert left the token's top-k
                if scores == "sigmoid":  # the other experts' logits of the token are left where they were
                    others = torch.arange(probe.num_experts) != expert
                    torch.testing.assert_close(probe.router_logits(tokens[token : token + 1])[0, others],
                                               logits.detach()[0, others])  # fmt: skip
                probe.router_weight.copy_(original)
            assert after < weights[token, slot], (name, token, slot)


def test_a_rule_that_does_not_pick_the_routers_experts_is_refused(family) -> None:
    name, model, probes, scores, biased = family
    if scores == "softmax" and not biased:
        pytest.skip("the softmax rule is this family's own")
    if name == "llama4":
        pytest.skip("Llama 4's rule is built into its probe, which reads the router's own scores")
    for probe in probes:
        probe.rule = SOFTMAX  # what STGC applied to every router before the rules
    with capturing(model, probes):
        ids = torch.randint(3, IMAGE - 4, (2, 24), generator=torch.Generator().manual_seed(2))
        model(input_ids=ids)
        with pytest.raises(ValueError, match="picks the router's experts for only"):
            for probe in probes:
                probe.check_rule(*probe.rule_counts().tolist())


def test_ernies_text_and_vision_experts_are_probed_apart_at_their_own_positions() -> None:
    torch.manual_seed(0)
    model = FAMILIES["ernie4_5_vl_moe"][0]().eval()
    probes = find_moe_probes(model)
    assert [probe.name for probe in probes] == ["layer_1_text_moe", "layer_1_vision_moe"]
    ids = torch.randint(3, IMAGE - 4, (2, 12), generator=torch.Generator().manual_seed(3))
    types = torch.zeros_like(ids)
    types[:, 3:7] = 1  # what the processor marks as vision tokens
    with capturing(model, probes):
        model(input_ids=ids, moe_mm_token_type_ids=types)
        for probe in probes:
            vision = probe.name.endswith("vision_moe")
            routing = probe.routing()
            expected = (types.reshape(-1).bool() == vision).nonzero().squeeze(1)
            assert torch.equal(routing.positions, expected), probe.name
            assert (routing.modality == MODALITIES["image" if vision else "text"]).all()


def test_llama4s_experts_under_the_probe_give_transformers_own_logits_and_gradients() -> None:
    torch.manual_seed(0)
    model = FAMILIES["llama4"][0]().double()
    ids = torch.randint(3, IMAGE - 4, (2, 12), generator=torch.Generator().manual_seed(4))
    reference = logits_and_grads(model, ids)  # transformers' own dense experts
    probes = find_moe_probes(model)
    assert len(probes) == 2 and all(probe.rule.scores == "sigmoid" for probe in probes)
    with capturing(model, probes, gradients=("exact", "output")):
        assert_same_logits_and_grads(logits_and_grads(model, ids), reference)
        for probe in probes:  # each expert's tokens are those the router chose for it
            routing = probe.routing()
            _, chosen = routed(router_of(model, probe.router_weight), routing.router_input)
            for expert, rows in enumerate(routing.expert_rows):
                assert torch.equal(rows, (chosen == expert).any(-1).nonzero().squeeze(1))
            for gradient in ("exact", "output"):
                conflicts = probe.conflicts(gradient, "all")
                assert conflicts.has_grad.any() and torch.isfinite(conflicts.cosine).all()
    assert "forward" not in vars(probes[0].experts)  # transformers' own forward again


@pytest.mark.parametrize("name", list(FAMILIES))
def test_stgc_trains_each_family_and_logs_its_statistics(name) -> None:
    torch.manual_seed(0)
    module = CausalLMModule(FAMILIES[name][0]())
    routers = [probe.router_weight for probe in find_moe_probes(module)]
    before = [weight.detach().clone() for weight in routers]
    # τ = 1 flags every assignment with a gradient: the CEL reaches every router there is
    trainer = cpu_trainer([STGC(threshold=1.0, loss_weight=0.1, histogram_every_n_steps=1)], max_steps=3)
    trainer.fit(module)
    metrics = trainer.callback_metrics
    for key in ("stgc/conflict_ratio/all", "stgc/cosine_mean/all", "stgc/cel_loss/all"):
        assert key in metrics and torch.isfinite(metrics[key]), (name, key)
    assert metrics["stgc/cel_loss/all"] > 0, name
    moved = [not torch.equal(b, w) for b, w in zip(before, routers, strict=True)]
    assert any(moved), name  # ERNIE's vision experts see no token of a text-only batch


@pytest.mark.parametrize("name", [name for name in FAMILIES if name != "llama4"])  # Llama 4: its own test
def test_the_stgc_experts_give_transformers_own_logits_and_gradients(name) -> None:
    torch.manual_seed(0)
    model = FAMILIES[name][0]().double()
    ids = torch.randint(3, IMAGE - 4, (2, 12), generator=torch.Generator().manual_seed(5))
    model.set_experts_implementation("eager")  # transformers' own loop (grouped_mm takes no float64)
    reference = logits_and_grads(model, ids)
    probes = find_moe_probes(model)
    with capturing(model, probes, gradients=("exact", "output")):
        ours = logits_and_grads(model, ids)
    assert_same_logits_and_grads(ours, reference)
