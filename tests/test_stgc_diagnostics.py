"""What STGC logs about its own mechanism — reroutes, p_{t,e} changes, the CEL's gradient share, expert
drift, the cosine's null level, the exact-vs-output correlation — and the CEL through a router bias,
each on a case where the right value is known or computed independently."""

import math
from functools import partial

import lightning as L
import pytest
import torch

from stgc.callback import STGC
from stgc.constants import MODALITIES
from stgc.method import STGCMethod, diagnostics
from stgc.method.diagnostics import expert_drift, pearson, pearson_sums, reroute_metrics, reroute_sums
from stgc.method.loss import conflict_elimination_loss
from stgc.method.probes import LayerConflicts
from stgc.method.statistics import LayerStats, host_values, layer_metrics
from stgc.moe.experts import expert_mlp
from support.lightning_models import (
    CausalLMModule,
    OppositeGroups,
    cpu_trainer,
    token_batches,
    upcycled_qwen2,
)

_trainer = partial(cpu_trainer, max_steps=1)


# -- the pieces, on constructed values ------------------------------------------------------------


def test_reroute_sums_on_hand_made_logits() -> None:
    """Two layers in one pass. Layer 0: 3 tokens, 4 experts, top-2; flagged: (0, e1) leaves token 0's
    top-2, (1, e0) stays; (2, e3) is an unflagged pair with a gradient, (2, e2) one without. Layer 1:
    2 tokens, nothing flagged, so its flagged figures are not defined (NaN, not logged)."""
    before = torch.tensor([[2.0, 1.0, 0.0, -1.0], [2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 1.0, 2.0]])
    after = torch.tensor([[2.0, -1.0, 0.0, -1.0], [1.5, 1.0, 0.0, -1.0], [0.0, 0.0, 1.0, 2.0]])
    rows, experts = torch.tensor([0, 1, 2, 2]), torch.tensor([1, 0, 3, 2])
    flagged = torch.tensor([True, True, False, False])
    valid = torch.tensor([True, True, True, False])
    before_1, after_1 = torch.zeros(2, 4), torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    rows_1, experts_1, none_1 = torch.tensor([1, 0]), torch.tensor([0, 1]), torch.zeros(2, dtype=torch.bool)
    sums = reroute_sums(
        [before, before_1], [after, after_1], [rows, rows_1], [experts, experts_1], [flagged, none_1],
        [valid, ~none_1], top_k=2,
    )  # fmt: skip
    p = lambda logits, t, e: float(logits[t].softmax(-1)[e])  # noqa: E731
    delta = (p(after, 0, 1) - p(before, 0, 1)) + (p(after, 1, 0) - p(before, 1, 0))
    delta_1 = (p(after_1, 1, 0) - p(before_1, 1, 0)) + (p(after_1, 0, 1) - p(before_1, 0, 1))
    expected = torch.tensor([[2.0, 1.0, delta, 1.0, 0.0], [0.0, 0.0, 0.0, 2.0, delta_1]], dtype=torch.float64)
    torch.testing.assert_close(sums, expected)
    metrics = host_values(reroute_metrics(["layer_0", "layer_1"], sums))
    assert metrics["stgc/reroute_rate/layer_0"] == 0.5
    assert metrics["stgc/delta_p_flagged/layer_0"] == pytest.approx(delta / 2, abs=1e-6)
    assert metrics["stgc/delta_p_other/layer_0"] == 0.0
    assert metrics.keys() == {
        "stgc/reroute_rate/layer_0", "stgc/delta_p_flagged/layer_0", "stgc/delta_p_other/layer_0",
        "stgc/delta_p_other/layer_1",
    }  # fmt: skip
    assert metrics["stgc/delta_p_other/layer_1"] == pytest.approx(delta_1 / 2, abs=1e-6)


def test_expert_drift_is_zero_for_copies_and_the_relative_distance_otherwise() -> None:
    mean = [torch.randn(3, 5), torch.randn(7)]
    assert float(expert_drift([w.expand(4, *w.shape).clone() for w in mean])) == 0.0  # 4 copies, fused
    offset = [torch.randn(3, 5), torch.randn(7)]
    experts = [torch.stack([m + d, m - d]) for m, d in zip(mean, offset, strict=True)]  # (2, ...) each
    norm = lambda ws: math.sqrt(sum(float(w.double().square().sum()) for w in ws))  # noqa: E731
    assert float(expert_drift(experts)) == pytest.approx(norm(offset) / norm(mean), rel=1e-6)
    assert float(expert_drift([w.bfloat16() for w in experts])) == pytest.approx(
        norm(offset) / norm(mean), rel=1e-2
    )


def test_pearson_from_sums_is_the_correlation_of_the_kept_pairs() -> None:
    x, y = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    y = 0.6 * x + y
    mask = torch.rand(50) > 0.3
    y_with_nan = torch.where(torch.arange(50) == 3, float("nan"), y)
    keep = mask & (torch.arange(50) != 3)
    expected = torch.corrcoef(torch.stack([x[keep], y[keep]]))[0, 1]
    torch.testing.assert_close(pearson(pearson_sums(x, y_with_nan, mask)), expected)


def _conflicts(expert: list[int], cosine: list[float]) -> LayerConflicts:
    n = len(expert)
    return LayerConflicts(
        torch.tensor(cosine), torch.arange(n), torch.tensor(expert), torch.ones(n, dtype=torch.bool), None,
        torch.tensor(True),
    )  # fmt: skip


def _null_level(conflicts: LayerConflicts, num_experts: int, leave_one_out: bool = False) -> float:
    """The logged null level of one layer's conflicts, none of them flagged."""
    flagged = torch.zeros_like(conflicts.has_grad)
    sums = LayerStats.vectors_of_layers(
        [conflicts], [flagged], [torch.tensor(0.0)], num_experts, leave_one_out
    )
    return float(layer_metrics(["l"], sums, num_experts, [num_experts], 1)["stgc/cosine_null/l"])


def test_null_level_is_the_mean_of_one_over_root_n_e_over_assignments() -> None:
    conflicts = _conflicts([0] * 9 + [1] * 4 + [2], [0.1] * 14)
    expected = (9 / 3 + 4 / 2 + 1 / 1) / 14
    assert _null_level(conflicts, 4) == pytest.approx(expected)
    assert _null_level(conflicts, 4, leave_one_out=True) == 0.0


def test_null_level_is_norm_matched_when_token_gradients_differ_in_norm() -> None:
    """For orthogonal token gradients cos(g_t, Σg) = ‖g_t‖ / √Σ‖g_j‖²: the null level weighs each token
    by its norm (1/√n_e only for equal norms). Checked on orthogonal gradients built outright."""
    from stgc.method.cosine import cosine_from_terms, linear_gradient_terms

    norms = torch.tensor([3.0, 1.0, 0.5, 0.1, 2.0], dtype=torch.float64)
    x = torch.eye(5, dtype=torch.float64) * norms[:, None]  # (5, 5): orthogonal inputs of these norms
    delta = torch.ones(5, 1, dtype=torch.float64)  # g_i = δ_i x_iᵀ: orthogonal, ‖g_i‖ = norms[i]
    terms = linear_gradient_terms(x, delta)
    cosine = cosine_from_terms(*terms)  # (5,) the brute-force cosines of orthogonal gradients
    conflicts = _conflicts([0] * 5, cosine.tolist())
    conflicts.sqnorm = terms[1]
    null = _null_level(conflicts, 1)
    assert null == pytest.approx(float(cosine.mean()))
    assert null < 1 / 5**0.5  # below the equal-norm level (Cauchy-Schwarz)


def test_cosines_of_unrelated_token_gradients_sit_at_the_null_level() -> None:
    """64 independent random token gradients in one expert: cos(g_t, Σg) ≈ 1/√64 with no agreement at
    all, while leaving g_t out gives ≈ 0 (the claim behind logging the null level)."""
    from stgc.method.cosine import cosine_from_terms, leave_one_out_cosine, linear_gradient_terms

    generator = torch.Generator().manual_seed(0)
    x, delta = torch.randn(64, 256, generator=generator), torch.randn(64, 128, generator=generator)
    terms = linear_gradient_terms(x.double(), delta.double())
    assert float(cosine_from_terms(*terms).mean()) == pytest.approx(1 / 8, abs=0.01)
    assert abs(float(leave_one_out_cosine(*terms).mean())) < 0.01


# -- the CEL through a router bias ----------------------------------------------------------------


def test_cel_logits_include_the_router_bias() -> None:
    """GPT-OSS routers have a bias: STGC's router gradient equals autograd of the CEL on x Wᵀ + b, for
    the weight and for the bias."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    model = GptOssForCausalLM(config)
    router = model.model.layers[0].mlp.router
    torch.nn.init.normal_(router.bias, std=1.0)
    seen = {}

    class Spy(L.Callback):
        def on_after_backward(self, trainer, pl_module):  # runs before STGC's: the LM's router gradient
            seen["lm"] = [router.weight.grad.clone(), router.bias.grad.clone()]
            probe = stgc.method.probes[0]
            seen["input"] = probe.routing().router_input.detach().clone()
            seen["conflicts"] = probe.conflicts()
            seen["weights"] = [router.weight.detach().clone(), router.bias.detach().clone()]

    stgc = STGC(threshold=0.5, loss_weight=1.0, loss_type="unlikelihood", histogram_every_n_steps=0)
    module = CausalLMModule(model, lr=0.0)
    _trainer([Spy(), stgc]).fit(module)
    assert seen["conflicts"].cosine.numel() > 0
    weight, bias = (w.requires_grad_() for w in seen["weights"])
    conflicts = seen["conflicts"]
    flagged = conflicts.has_grad & (conflicts.cosine < 0.5)
    logits = torch.nn.functional.linear(seen["input"], weight, bias)
    loss = conflict_elimination_loss(logits, conflicts.rows, conflicts.expert, "unlikelihood", flagged)
    expected = torch.autograd.grad(loss, [weight, bias])
    assert expected[1].abs().sum() > 0
    for got, lm, cel in zip([router.weight.grad, router.bias.grad], seen["lm"], expected, strict=True):
        torch.testing.assert_close(got - lm, cel, rtol=1e-5, atol=1e-7)


# -- in training ----------------------------------------------------------------------------------


class RouterSnapshots(L.Callback):
    """The router of OppositeGroups before and after the step, and its gradient before STGC's part."""

    def __init__(self) -> None:
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen["before"] = pl_module.moe.router.weight.detach().clone()

    def on_after_backward(self, trainer, pl_module):
        self.seen["lm_grad"] = pl_module.moe.router.weight.grad.clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen["total_grad"] = pl_module.moe.router.weight.grad.clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen["after"] = pl_module.moe.router.weight.detach().clone()


@pytest.mark.parametrize("loss_type", ["negated_logits", "negated_logits_per_expert", "unlikelihood"])
def test_logged_reroutes_p_changes_and_gradient_ratio_match_the_routers_before_and_after(loss_type) -> None:
    """OppositeGroups: 8 copies of one token, top-1 of 2 experts, 2 of them flagged. All 8 are the same
    token, so each flagged one leaves its expert exactly when the token's argmax changes."""
    module = OppositeGroups()
    snapshots = RouterSnapshots()
    callback = STGC(loss_weight=5.0, loss_type=loss_type, histogram_every_n_steps=0)
    trainer = _trainer([snapshots, callback])
    trainer.fit(module)
    seen, metrics = snapshots.seen, trainer.callback_metrics
    p_before = (seen["before"] @ module.token).softmax(-1)
    p_after = (seen["after"] @ module.token).softmax(-1)
    chosen = int(p_before.argmax())
    assert float(metrics["stgc/reroute_rate/moe"]) == float(int(p_after.argmax()) != chosen)
    delta = float(p_after[chosen] - p_before[chosen])
    assert float(metrics["stgc/delta_p_flagged/moe"]) == pytest.approx(delta, abs=1e-6)
    assert float(metrics["stgc/delta_p_other/moe"]) == pytest.approx(delta, abs=1e-6)
    cel_grad = seen["total_grad"] - seen["lm_grad"]
    expected_ratio = float(cel_grad.norm() / seen["lm_grad"].norm())
    assert float(metrics["stgc/cel_grad_ratio/moe"]) == pytest.approx(expected_ratio, rel=1e-5)


def test_without_the_cel_and_without_a_step_nothing_is_rerouted() -> None:
    module = OppositeGroups()
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.0)
    trainer = _trainer([STGC(loss_weight=0.0, histogram_every_n_steps=0)])
    trainer.fit(module)
    metrics = trainer.callback_metrics
    assert float(metrics["stgc/reroute_rate/moe"]) == 0.0
    assert float(metrics["stgc/delta_p_flagged/moe"]) == 0.0
    assert "stgc/cel_grad_ratio/moe" not in metrics  # λ = 0: no CEL gradient to compare
    assert float(metrics["stgc/expert_drift/moe"]) == 0.0  # upcycled copies, no step


def test_expert_drift_logged_is_that_of_the_layers_experts() -> None:
    model = upcycled_qwen2()
    trainer = _trainer([STGC(histogram_every_n_steps=0)])
    trainer.fit(CausalLMModule(model, lr=0.0))
    for index, layer in enumerate(model.model.layers):
        experts = [p.detach() for p in layer.mlp.experts.parameters()]  # (E, ...) each
        logged = float(trainer.callback_metrics[f"stgc/expert_drift/layer_{index}"])
        assert logged == pytest.approx(float(expert_drift(experts)), rel=1e-6) and logged > 0


def test_diagnostics_run_on_logging_steps_only(monkeypatch) -> None:
    calls = {"reroute": 0, "drift": 0}

    def counting(name, function):
        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return counted

    monkeypatch.setattr("stgc.method.core.reroute_sums", counting("reroute", diagnostics.reroute_sums))
    monkeypatch.setattr("stgc.method.core.expert_drift", counting("drift", diagnostics.expert_drift))
    trainer = _trainer([STGC(histogram_every_n_steps=0)], max_steps=6, log_every_n_steps=3)
    trainer.fit(CausalLMModule(upcycled_qwen2()))
    assert calls == {"reroute": 2, "drift": 2 * 2}  # steps 3 and 6: the layers in one pass; drift per layer


def test_exact_output_pearson_is_logged_on_histogram_steps_from_both_cosines() -> None:
    model = upcycled_qwen2()
    callback = STGC(gradient="output", histogram_every_n_steps=1)
    seen = []

    class Spy(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            seen.append([probe.conflicts("output") for probe in callback.method.probes])

    trainer = _trainer([Spy(), callback])
    trainer.fit(CausalLMModule(model))
    for index, conflicts in enumerate(seen[-1]):
        exact, output = conflicts.cosines["exact"], conflicts.cosines["output"]
        keep = conflicts.has_grad
        expected = torch.corrcoef(torch.stack([exact[keep], output[keep]]).double())[0, 1]
        logged = trainer.callback_metrics[f"stgc/exact_output_pearson/layer_{index}"]
        assert float(logged) == pytest.approx(float(expected), abs=1e-5)
        assert torch.equal(conflicts.cosine, output)


def test_exact_output_pearson_of_a_constant_side_is_not_logged() -> None:
    """Layer 0's exact cosines are constant (no correlation defined), layer 1's are not: only layer 1's
    figure reaches the host."""
    method = STGCMethod()
    method.attach(upcycled_qwen2())
    output = torch.tensor([0.1, -0.3, 0.4, 0.2])
    layers = []
    for exact in (torch.full((4,), 0.5), torch.tensor([0.2, -0.1, 0.5, 0.1])):
        conflicts = _conflicts([0, 1, 2, 3], output.tolist())
        conflicts.cosines = {"exact": exact, "output": output}
        layers.append(conflicts)
    logged = host_values(method.exact_output_pearson(layers))
    expected = torch.corrcoef(torch.stack([layers[1].cosines["exact"], output]).double())[0, 1]
    assert logged.keys() == {"stgc/exact_output_pearson/layer_1"}
    assert logged["stgc/exact_output_pearson/layer_1"] == pytest.approx(float(expected), abs=1e-6)


def test_output_gradient_mode_captures_no_expert_inputs_off_histogram_steps() -> None:
    """In "output" mode, off histogram steps the probes keep no X and compute no exact terms."""
    model = upcycled_qwen2()
    callback = STGC(gradient="output", histogram_every_n_steps=0)
    pending = []

    class Spy(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            probe = callback.method.probes[0]
            pending.append(
                (probe.capture_exact, probe.capture_output, sorted(probe.conflicts("output").cosines))
            )

    _trainer([Spy(), callback]).fit(CausalLMModule(model))
    assert pending == [(False, True, ["output"])]


def test_unknown_gradient_or_mean_is_refused() -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="gradient='weights'"):
        STGC(gradient="weights")
    with pytest.raises(MisconfigurationException, match="mean='none'"):
        STGC(mean="none")


def test_position_share_counts_layers_where_a_position_conflicts() -> None:
    from stgc.method.statistics import position_conflict_share

    # layer 0: rows are positions 0..3, (row, expert) pairs; layer 1 routes rows [0, 1] = positions [2, 3]
    layer0 = LayerConflicts(
        torch.zeros(6), torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([0, 0, 1, 1, 1, 1]),
        torch.tensor([True, True, True, True, True, False]), None, torch.tensor(True),
    )  # fmt: skip
    flagged0 = torch.tensor([False, False, True, False, True, False])  # positions 2 and 0 conflict
    layer1 = LayerConflicts(
        torch.zeros(2), torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([True, True]), None,
        torch.tensor(True),
    )  # fmt: skip
    flagged1 = torch.tensor([True, False])  # position 2 conflicts
    share = position_conflict_share([layer0, layer1], [flagged0, flagged1], [None, torch.tensor([2, 3])], 5)
    expected = torch.tensor([1.0, 0.0, 1.0, 0.0, float("nan")])
    torch.testing.assert_close(share, expected, equal_nan=True)


class PictureData(L.LightningDataModule):
    """The training batches of CausalLMModule, and a fixed sample for the conflict picture."""

    def __init__(self) -> None:
        super().__init__()
        self.sample = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(1))

    def train_dataloader(self):
        return token_batches()

    def conflict_picture_sample(self):
        return {"input_ids": self.sample}


class WithPicture(CausalLMModule):
    """A module offering the conflict picture's two methods; it records what the callback hands it."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.shares = []

    def conflict_picture_loss(self, batch):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def conflict_picture(self, batch, token_share):
        self.shares.append(token_share)
        return torch.zeros(4, 4, 3, dtype=torch.uint8).numpy()


def _batch_gradient_and_sample_cosines(sample, batch):
    """Brute force, per MoE layer of upcycled_qwen2: each expert's summed gradient over `batch` (a plain
    backward), and the cosine of each of the sample's token gradients in that expert with it."""
    from torch.func import functional_call

    from support.brute_force import token_gradients

    trained = upcycled_qwen2()
    trained(input_ids=batch, labels=batch).loss.backward()
    model = upcycled_qwen2()
    captured = {}

    def keep(index):
        def hook(module, args, output):
            output.retain_grad()
            captured[index] = (args[0].reshape(-1, args[0].shape[-1]), output)

        return hook

    for index, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(keep(index))
    model(input_ids=sample, labels=sample).loss.backward()
    cosines = {}  # (layer, expert) -> (rows, cosines)
    for index, layer in enumerate(model.model.layers):
        inputs, output = captured[index]
        record = layer.mlp.last_routing
        for e in range(layer.mlp.num_experts):
            expert = expert_mlp(layer.mlp.experts, e)  # a dense copy, run token by token
            params = {k: v.detach() for k, v in expert.named_parameters()}
            rows, flat = token_gradients(
                lambda p, x, ex=expert: functional_call(ex, p, (x,)), params, inputs.detach(),
                output.grad.reshape(-1, output.shape[-1]), record.topk_index, record.topk_weight, e,
            )  # fmt: skip
            batch_experts = trained.model.layers[index].mlp.experts
            total = torch.cat([p.grad[e].reshape(-1) for p in batch_experts.parameters()])
            cosines[index, e] = (rows, torch.nn.functional.cosine_similarity(flat, total[None], dim=1))
    return cosines


def test_conflict_picture_compares_the_fixed_sample_with_the_batch_and_leaves_training_alone(
    tmp_path, monkeypatch
) -> None:
    """The share handed to the module comes from the fixed sample's token gradients against each
    expert's summed gradient over the training batch (brute force, 1e-5); training with the picture
    is bit-identical to training without it (gradients and RNG state at the optimizer step)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from stgc.method import core

    recorded = {}
    original = core.position_conflict_share

    def record(layers, conflicting, positions, length):
        recorded["layers"] = layers
        return original(layers, conflicting, positions, length)

    monkeypatch.setattr(core, "position_conflict_share", record)
    module, data = WithPicture(upcycled_qwen2()), PictureData()
    seen = {}

    def spy(store):
        class Spy(L.Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                store["grads"] = [p.grad.clone() for p in pl_module.parameters()]
                store["rng"] = torch.random.get_rng_state()

        return Spy()

    logger = TensorBoardLogger(tmp_path, name="run")
    callback = STGC(threshold=0.0, loss_weight=0.0, histogram_every_n_steps=1)
    torch.manual_seed(0)
    _trainer([callback, spy(seen)], logger=logger).fit(module, datamodule=data)
    assert len(module.shares) == 1 and module.shares[0].shape == (10,)
    batch = next(iter(module.train_dataloader()))[0]
    expected = _batch_gradient_and_sample_cosines(data.sample, batch)
    for index, conflicts in enumerate(recorded["layers"]):
        for e in range(4):
            mine = conflicts.expert == e
            order = torch.argsort(conflicts.rows[mine])
            rows, cosines = expected[index, e]
            assert torch.equal(conflicts.rows[mine][order], rows)
            torch.testing.assert_close(conflicts.cosine[mine][order], cosines, atol=1e-5, rtol=0)
    plain_seen = {}  # the same run with a module that offers no picture
    plain = CausalLMModule(upcycled_qwen2())
    plain_logger = TensorBoardLogger(tmp_path, name="plain")
    plain_callback = STGC(threshold=0.0, loss_weight=0.0, histogram_every_n_steps=1)
    torch.manual_seed(0)
    _trainer([plain_callback, spy(plain_seen)], logger=plain_logger).fit(plain)
    for with_picture, without in zip(seen["grads"], plain_seen["grads"], strict=True):
        assert torch.equal(with_picture, without)
    assert torch.equal(seen["rng"], plain_seen["rng"])


def test_stats_of_all_layers_in_one_pass_are_each_layers_own_sums() -> None:
    """Layers of different sizes, with and without modality and norms: every field equals the sums taken
    directly over that layer's assignments."""
    generator = torch.Generator().manual_seed(0)
    layers, flags = [], []
    for size, modality, with_norms in ((9, True, True), (4, False, False), (12, True, False)):
        conflicts = LayerConflicts(
            torch.rand(size, generator=generator) * 2 - 1, torch.arange(size),
            torch.randint(3, (size,), generator=generator), torch.rand(size, generator=generator) > 0.2,
            torch.randint(2, (size,), generator=generator) if modality else None, torch.tensor(True),
        )  # fmt: skip
        conflicts.sqnorm = torch.rand(size, generator=generator) if with_norms else None
        layers.append(conflicts)
        flags.append(conflicts.has_grad & (conflicts.cosine < 0))
    losses = [torch.tensor(float(i)) for i in range(3)]
    all_stats = [LayerStats.from_vector(v, 4) for v in LayerStats.vectors_of_layers(layers, flags, losses, 4)]
    # what a step that logs nothing counts
    assignments, conflicts = LayerStats.tallies_of_layers(layers, flags, 4)
    assert torch.equal(assignments, torch.stack([s.assignments for s in all_stats]))
    assert torch.equal(conflicts, torch.stack([s.conflicts for s in all_stats]))
    for stats, c, flagged, loss in zip(all_stats, layers, flags, losses, strict=True):
        valid = c.has_grad
        norms = torch.ones(len(valid)) if c.sqnorm is None else c.sqnorm
        for e in range(4):
            assert stats.assignments[e] == (valid & (c.expert == e)).sum()
            assert stats.conflicts[e] == (flagged & (c.expert == e)).sum()
        assert float(stats.cosine) == pytest.approx(float(c.cosine[valid].sum()))
        assert float(stats.cosine_sq) == pytest.approx(float(c.cosine[valid].square().sum()))
        null = sum(
            float(norms[i].sqrt() / norms[valid & (c.expert == c.expert[i])].sum().sqrt())
            for i in range(len(valid)) if valid[i]
        )  # fmt: skip
        assert float(stats.cosine_null) == pytest.approx(null)
        for name, value in MODALITIES.items():
            is_modality = torch.zeros_like(valid) if c.modality is None else c.modality == value
            assert getattr(stats, name) == (valid & is_modality).sum()
            assert getattr(stats, f"{name}_conflicts") == (flagged & is_modality).sum()
        assert stats.cel_loss == loss
