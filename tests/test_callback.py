"""STGC callback: exact cosines inside real models, the CEL's effect, and Lightning integration."""

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from stgc.callback import STGC
from stgc.constants import MODALITIES
from stgc.method import find_moe_probes
from stgc.method.hf_experts import restore_experts, use_stgc_experts
from stgc.method.probes import all_conflicts
from stgc.moe import SparseMoE
from stgc.moe.experts import expert_mlp
from support.brute_force import token_gradients
from support.lightning_models import (
    CausalLMModule,
    ForeignMoEModule,
    OppositeGroups,
    cpu_trainer,
    tiny_olmoe,
    token_batches,
    upcycled_qwen2,
)

# -- exactness inside real models -----------------------------------------------------------------


def _brute_force_cosines(
    expert_fn,
    expert_params,
    inputs,
    output_grads,
    topk_index,
    topk_weight,
    expert,
    gradient="exact",
    mean="all",
):
    """Per-token gradients of one expert (support.brute_force), and their cosine to the sum of all of
    them (mean="all") or of the others (mean="others")."""
    rows, flat = token_gradients(
        expert_fn, expert_params, inputs, output_grads, topk_index, topk_weight, expert, gradient
    )
    total = flat.sum(dim=0, keepdim=True)
    reference = total - flat if mean == "others" else total.expand_as(flat)
    return rows, torch.nn.functional.cosine_similarity(flat, reference, dim=1)


def _probe_cosines(conflicts, expert):
    mine = conflicts.expert == expert
    return conflicts.rows[mine], conflicts.cosine[mine]


def _moe_io(model, moe_type):
    """Forward hooks keeping each MoE block's input and output (with retained grad)."""
    captured = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            captured[name] = (args[0].reshape(-1, args[0].shape[-1]), output)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, moe_type):
            module.register_forward_hook(keep(name))
    return captured


@pytest.mark.parametrize("mean", ["all", "others"])
@pytest.mark.parametrize("gradient", ["exact", "output"])
def test_sparse_moe_cosines_match_brute_force_per_token_gradients(gradient, mean) -> None:
    model = upcycled_qwen2().double()
    probes = find_moe_probes(model)
    captured = _moe_io(model, SparseMoE)
    for probe in probes:
        probe.start(capturing=True, gradients=("exact", "output"))
    ids = next(iter(token_batches()))[0]
    model(input_ids=ids, labels=ids).loss.backward()
    worst = 0.0
    layers = all_conflicts(probes, gradient, mean)  # both layers in one pass, as after_backward takes them
    for conflicts, (name, (inputs, output)) in zip(layers, captured.items(), strict=True):
        layer = dict(model.named_modules())[name]
        record = layer.last_routing
        for expert_index in range(layer.num_experts):
            expert = expert_mlp(layer.experts, expert_index)  # a dense copy, run token by token
            params = {k: v.detach() for k, v in expert.named_parameters()}
            rows, expected = _brute_force_cosines(
                lambda p, x, e=expert: functional_call(e, p, (x,)),
                params,
                inputs.detach(),
                output.grad.reshape(-1, output.shape[-1]),
                record.topk_index,
                record.topk_weight.double(),
                expert_index,
                gradient,
                mean,
            )
            got_rows, got = _probe_cosines(conflicts, expert_index)
            order = torch.argsort(got_rows)
            assert torch.equal(got_rows[order], rows)
            worst = max(worst, (got[order] - expected).abs().max().item())
    assert worst <= 1e-6, worst


def _olmoe():
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    return tiny_olmoe(), OlmoeSparseMoeBlock


def _glm4v_moe():  # sigmoid router with a correction bias, group-limited top-k, a shared expert
    from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeTextMoE

    from support.moe_vlms import glm4v_moe

    return glm4v_moe(), Glm4vMoeTextMoE


@pytest.mark.parametrize("family", [_olmoe, _glm4v_moe])
@pytest.mark.parametrize(("gradient", "mean"), [("exact", "all"), ("output", "others")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: all experts in one grouped_mm
def test_transformers_experts_cosines_match_brute_force(family, gradient, mean, dtype) -> None:
    model, moe_type = family()
    model = model.to(dtype)
    previous = use_stgc_experts(model)
    probes = find_moe_probes(model)
    captured = _moe_io(model, moe_type)
    for probe in probes:
        probe.start(capturing=True, gradients=(gradient,))
    ids = next(iter(token_batches()))[0]
    model(input_ids=ids, labels=ids).loss.backward()
    layers = all_conflicts(probes, gradient, mean)
    for conflicts, (name, (inputs, output)) in zip(layers, captured.items(), strict=True):
        block = dict(model.named_modules())[name]
        _, topk_weight, topk_index = block.gate(inputs.detach())
        experts = block.experts
        for expert_index in range(experts.num_experts):
            params = {  # the brute force in float64 whatever the model's dtype
                "gate_up": experts.gate_up_proj[expert_index].detach().double(),
                "down": experts.down_proj[expert_index].detach().double(),
            }

            def expert_fn(p, x, experts=experts):
                gate, up = torch.nn.functional.linear(x, p["gate_up"]).chunk(2, dim=-1)
                return torch.nn.functional.linear(experts.act_fn(gate) * up, p["down"])

            rows, expected = _brute_force_cosines(
                expert_fn,
                params,
                inputs.detach().double(),
                output.grad.reshape(-1, output.shape[-1]).double(),
                topk_index,
                topk_weight.double(),
                expert_index,
                gradient,
                mean,
            )
            got_rows, got = _probe_cosines(conflicts, expert_index)
            order = torch.argsort(got_rows)
            assert torch.equal(got_rows[order], rows)
            atol = 1e-6 if dtype == torch.float64 else 1e-4
            torch.testing.assert_close(got[order].double(), expected, atol=atol, rtol=0)
    restore_experts(previous)


def test_stgc_experts_implementation_matches_eager() -> None:
    model = tiny_olmoe()
    ids = next(iter(token_batches()))[0]
    model.set_experts_implementation("eager")
    eager = model(input_ids=ids).logits
    previous = use_stgc_experts(model)
    assert model.get_experts_implementation()[""] == "stgc"
    torch.testing.assert_close(model(input_ids=ids).logits, eager)
    restore_experts(previous)
    assert model.get_experts_implementation()[""] == "eager"


# -- the method on a constructed expert -----------------------------------------------------------


def test_minority_with_opposite_gradients_is_flagged_and_routed_away() -> None:
    runs = {}
    for loss_weight in (0.0, 1.0):
        module = OppositeGroups()
        chosen = int(module.expert_probability().argmax())
        callback = STGC(loss_weight=loss_weight, histogram_every_n_steps=0)
        seen = {}
        original = callback.on_after_backward

        def spy(trainer, pl_module, original=original, callback=callback, seen=seen):
            seen["conflicts"] = callback.method.probes[0].conflicts()
            original(trainer, pl_module)

        callback.on_after_backward = spy
        cpu_trainer([callback], max_steps=1).fit(module)
        runs[loss_weight] = (module, seen["conflicts"], chosen)

    (baseline, conflicts, chosen), (treated, _, _) = runs[0.0], runs[1.0]
    order = torch.argsort(conflicts.rows)
    torch.testing.assert_close(conflicts.cosine[order], torch.tensor([1.0] * 6 + [-1.0] * 2))
    assert torch.equal(conflicts.expert, torch.full((8,), chosen))
    for (name, before), after in zip(baseline.named_parameters(), treated.parameters(), strict=True):
        if name == "moe.router.weight":
            assert not torch.equal(before, after), "the CEL must move the router"
        else:
            assert torch.equal(before, after), f"the CEL changed {name}"
    assert treated.expert_probability()[chosen] < baseline.expert_probability()[chosen]


# -- Lightning integration ------------------------------------------------------------------------


def test_foreign_transformers_moe_trains_with_stgc_and_logs_statistics() -> None:
    module = ForeignMoEModule()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = cpu_trainer([STGC(loss_weight=0.1, histogram_every_n_steps=0)])
    trainer.fit(module)
    metrics = trainer.callback_metrics
    for key in (
        "stgc/conflict_ratio/all",
        "stgc/cosine_mean/all",
        "stgc/cosine_std/all",
        "stgc/cel_loss/all",
        "stgc/conflict_ratio/layer_0",
        "stgc/expert_load/layer_1/expert_3",
        "stgc/expert_conflict_ratio/layer_0/expert_0",
    ):
        assert key in metrics, key
    assert 0.0 <= float(metrics["stgc/conflict_ratio/all"]) <= 1.0
    assert module.model.get_experts_implementation()[""] != "stgc"  # restored at teardown
    assert all(not torch.equal(before[n], p) for n, p in module.named_parameters() if "gate.weight" in n)


def test_modality_split_is_logged_for_our_moe() -> None:
    module = CausalLMModule(upcycled_qwen2())

    class WithModality(CausalLMModule):
        def training_step(self, batch, batch_idx):
            from stgc.moe import routing_context

            (ids,) = batch
            image = torch.arange(ids.shape[1]) < 4  # the first 4 positions
            modality = torch.where(image, MODALITIES["image"], MODALITIES["text"]).expand_as(ids)
            with routing_context(self.model, torch.ones_like(ids, dtype=torch.bool), modality):
                return self.model(input_ids=ids, labels=ids).loss

    module = WithModality(module.model)
    trainer = cpu_trainer([STGC(histogram_every_n_steps=0)])
    trainer.fit(module)
    assert "stgc/conflict_ratio_image/layer_0" in trainer.callback_metrics
    assert "stgc/conflict_ratio_text/layer_1" in trainer.callback_metrics


def test_no_moe_layer_is_a_clear_error_at_fit_start() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dense = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(MisconfigurationException, match="found no MoE layer in CausalLMModule"):
        cpu_trainer([STGC()]).fit(CausalLMModule(dense))


def test_sharded_strategies_are_refused_by_name() -> None:
    """Lightning's FSDP needs CUDA (it refuses accelerator="cpu"), so this checks the refusal itself."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy(), precision="32-true")
    with pytest.raises(MisconfigurationException, match="STGC does not support FSDPStrategy: .* Use DDP"):
        STGC().setup(trainer, CausalLMModule(upcycled_qwen2()), "fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 2.0}, "threshold=2.0"),
        ({"loss_weight": -1.0}, "loss_weight=-1.0"),
        ({"loss_type": "kl"}, "loss_type='kl'"),
        ({"every_n_steps": 0}, "every_n_steps=0"),
        ({"log_every_n_steps": 0}, "log_every_n_steps=0"),
        ({"histogram_every_n_steps": -1}, "histogram_every_n_steps=-1"),
    ],
)
def test_arguments_are_validated(kwargs, match) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        STGC(**kwargs)


def _router_weights(module) -> list[torch.Tensor]:
    return [p.detach().clone() for n, p in module.named_parameters() if "router" in n]


def test_accumulating_two_identical_micro_batches_equals_one_batch() -> None:
    """LM loss and CEL are both divided by the accumulation steps, so the update is the same."""
    one_batch = CausalLMModule(upcycled_qwen2())
    ids = next(iter(token_batches()))[0]
    one_batch.train_dataloader = lambda: DataLoader(TensorDataset(ids), batch_size=4)
    twice = CausalLMModule(upcycled_qwen2())
    twice.train_dataloader = lambda: DataLoader(TensorDataset(torch.cat([ids, ids])), batch_size=4)
    # τ = 0: at the default −0.1 this tiny random model may flag no token, and the CEL would be idle
    single = STGC(loss_weight=1.0, threshold=0.0, histogram_every_n_steps=0)
    accumulated = STGC(loss_weight=1.0, threshold=0.0, histogram_every_n_steps=0)
    cpu_trainer([single], max_steps=1).fit(one_batch)
    cpu_trainer([accumulated], max_steps=1, accumulate_grad_batches=2).fit(twice)
    assert (single.method.measured_micro_batches, accumulated.method.measured_micro_batches) == (1, 2)
    for a, b in zip(one_batch.parameters(), twice.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    baseline = CausalLMModule(upcycled_qwen2())
    baseline.train_dataloader = one_batch.train_dataloader
    cpu_trainer([STGC(loss_weight=0.0, histogram_every_n_steps=0)], max_steps=1).fit(baseline)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(_router_weights(baseline), _router_weights(one_batch), strict=True)
    )


def test_resume_restores_running_statistics(tmp_path) -> None:
    first = STGC(histogram_every_n_steps=0)
    trainer = cpu_trainer([first], max_steps=2, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(CausalLMModule(upcycled_qwen2()))
    checkpoint = next((tmp_path / "checkpoints").glob("*.ckpt"))
    resumed = STGC(histogram_every_n_steps=0)
    cpu_trainer([resumed], max_steps=4, default_root_dir=tmp_path).fit(
        CausalLMModule(upcycled_qwen2()), ckpt_path=checkpoint
    )
    assert resumed.method.measured_micro_batches == 4
    assert torch.all(resumed.method.assignment_counts >= first.method.assignment_counts)
    assert resumed.method.assignment_counts.sum() > first.method.assignment_counts.sum()


def test_every_n_steps_and_start_step() -> None:
    callback = STGC(start_step=1, every_n_steps=2, histogram_every_n_steps=0)
    cpu_trainer([callback], max_steps=4).fit(CausalLMModule(upcycled_qwen2()))
    assert callback.method.measured_micro_batches == 2  # steps 1 and 3


class NaNAtLastStep(CausalLMModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx == 2 else loss


def test_non_finite_step_is_skipped_and_counted() -> None:
    module = NaNAtLastStep(upcycled_qwen2())
    callback = STGC(loss_weight=1.0, histogram_every_n_steps=0)
    decisions = []
    original = callback.method._agree_across_ranks

    def spy(*args, **kwargs):
        finite, router_grads = original(*args, **kwargs)
        decisions.append(finite)
        return finite, router_grads

    callback.method._agree_across_ranks = spy
    cpu_trainer([callback], max_steps=3).fit(module)
    assert decisions == [True, True, False]  # the NaN step adds nothing to the routers
    assert callback.method.skipped_nonfinite == 1
    assert callback.method.measured_micro_batches == 2


def test_bf16_mixed_precision_gives_finite_conflicts() -> None:
    callback = STGC(loss_weight=0.1, histogram_every_n_steps=0)
    trainer = cpu_trainer([callback], precision="bf16-mixed")
    trainer.fit(CausalLMModule(upcycled_qwen2()))
    assert callback.method.skipped_nonfinite == 0 and callback.method.measured_micro_batches == 2
    assert torch.isfinite(trainer.callback_metrics["stgc/cosine_mean/all"])


def test_histograms_and_heatmap_reach_tensorboard(tmp_path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="stgc")
    cpu_trainer([STGC(histogram_every_n_steps=1)], logger=logger).fit(CausalLMModule(upcycled_qwen2()))
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "images": 0}).Reload()
    assert {"stgc/cosine/layer_0", "stgc/cosine/layer_1"} <= set(events.Tags()["histograms"])
    assert "stgc/conflict_ratio_heatmap" in events.Tags()["images"]
    assert "stgc/conflict_ratio/all" in events.Tags()["scalars"]


def _ddp_run(tmp_path, *flags):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "support" / "ddp_stgc.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), *flags], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.slow  # 2 processes, ~20 s; tests/test_ddp.py covers DDP in the default run
def test_ddp_replicas_stay_identical_with_the_router_gradient_all_reduced(tmp_path) -> None:
    rank0, rank1 = _ddp_run(tmp_path)
    assert rank0["measured"] == rank1["measured"] == 3
    for name, value in rank0["state_dict"].items():
        torch.testing.assert_close(value, rank1["state_dict"][name], atol=0, rtol=0, msg=name)
    control = tmp_path / "control"
    control.mkdir()
    rank0, rank1 = _ddp_run(control, "--no-reduce")  # without the all-reduce the routers drift apart
    routers = [n for n in rank0["state_dict"] if "router" in n]
    assert any(not torch.equal(rank0["state_dict"][n], rank1["state_dict"][n]) for n in routers)


def test_ddp_step_non_finite_on_one_rank_only_is_skipped_on_both_without_a_hang(tmp_path) -> None:
    """Rank 1's gradients are NaN at step 1, rank 0's finite: both decide together to skip (one
    all-reduce), so no rank waits alone in a collective, and the replicas stay identical."""
    rank0, rank1 = _ddp_run(tmp_path, "--nan-on-one-rank")
    assert (rank0["skipped_nonfinite"], rank1["skipped_nonfinite"]) == (1, 1)
    assert rank0["measured"] == rank1["measured"] == 2
    for name, value in rank0["state_dict"].items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value, rank1["state_dict"][name], atol=0, rtol=0, msg=name)


def test_transformers_models_use_stgc_experts_only_while_stgc_captures() -> None:
    """Our per-expert implementation serves the steps STGC measures, and only their forward and
    backward: other steps, and the optimizer step, run the model's own implementation."""
    module = ForeignMoEModule()
    own = module.model.get_experts_implementation()[""]

    class Record(L.Callback):
        def __init__(self) -> None:
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.seen.append(pl_module.model.get_experts_implementation()[""])

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.seen.append(pl_module.model.get_experts_implementation()[""])

    record = Record()
    cpu_trainer([STGC(every_n_steps=2, histogram_every_n_steps=0), record], max_steps=3).fit(module)
    assert own != "stgc"
    assert record.seen == ["stgc", own, own, own, "stgc", own]
