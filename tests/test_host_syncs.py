"""Host-device syncs of a training step: the counter sees the known sync points, and a step with STGC
has a number of them that does not grow with the number of MoE layers."""

import lightning as L
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from stgc import STGC
from stgc.constants import MODALITIES
from stgc.host_syncs import HostSyncCounter
from stgc.method.statistics import host_values
from stgc.moe import moe_losses, routing_context, upcycle
from support.lightning_models import VOCAB, token_batches


def test_counter_sees_each_known_sync_point_in_forward_and_in_backward_hooks() -> None:
    x = torch.randn(6, requires_grad=True)

    def hook(grad: torch.Tensor) -> torch.Tensor:
        bool((grad > 0).any())  # inside backward: item
        return grad

    with HostSyncCounter() as syncs:
        y = x * 2
        y.sum().item()
        y.tolist()
        y.nonzero()
        y[y > 0]
        torch.bincount(torch.tensor([0, 2]))
        torch.unique(torch.tensor([1, 1, 2]))
        torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]))
        torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]), output_size=3)  # no sync
        y.register_hook(hook)
        y.sum().backward()
    assert dict(syncs.by_kind) == {
        "item": 2,
        "tolist": 1,
        "nonzero": 1,
        "boolean_index": 1,
        "bincount": 1,
        "unique": 1,
        "repeat_interleave": 1,
    }


class Wrapper(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model


def _step_syncs(num_layers: int, with_stgc: bool, logging: bool = False) -> int:
    """Host syncs of one forward + backward (+ STGC's hook) of an upcycled LM whose every layer is
    MoE, routed through a token mask with modalities as the LVLM routes; with `logging`, a logging step
    whose metrics reach the host, and the next step's reroute metrics."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = upcycle(Qwen2ForCausalLM(config), layers="all")
    module = Wrapper(model)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, log_every_n_steps=10**6)
    trainer.strategy.connect(module)
    callback = STGC(
        loss_weight=0.1, threshold=0.0, histogram_every_n_steps=0, log_every_n_steps=1 if logging else None
    )
    if with_stgc:
        callback.setup(trainer, module, "fit")
        callback.on_train_batch_start(trainer, module, None, 0)
    ids = next(iter(token_batches()))[0]
    mask = torch.ones_like(ids, dtype=torch.bool)
    image = torch.arange(ids.shape[1]) < 4  # the first 4 positions
    modality = torch.where(image, MODALITIES["image"], MODALITIES["text"]).expand_as(ids)
    with HostSyncCounter() as syncs:
        with routing_context(model, mask, modality):
            loss = model(input_ids=ids, labels=ids).loss + 0.01 * moe_losses(model)[0]
        loss.backward()
        if with_stgc:
            callback.on_after_backward(trainer, module)
        if logging:  # what the callback does once the routers have been updated
            host_values(callback.method.measure_reroutes())
    if with_stgc:
        assert callback.method.measured_micro_batches == 1
    return syncs.total


@pytest.mark.parametrize("with_stgc", [False, True])
def test_each_moe_layer_adds_only_its_split_sizes(with_stgc) -> None:
    """The experts' loop needs their token counts on the host: one sync per layer, as in transformers'
    eager experts; nothing else grows with depth."""
    assert _step_syncs(4, with_stgc) - _step_syncs(2, with_stgc) == 2


def test_stgc_adds_one_sync_per_step_whatever_the_depth() -> None:
    """STGC's whole step (cosines, masks, CEL gradients, counts) costs one host read: the skip decision."""
    for layers in (2, 4):
        assert _step_syncs(layers, True) - _step_syncs(layers, False) == 1


def test_a_logging_step_adds_one_sync_for_its_metrics_and_one_for_its_reroutes_whatever_the_depth() -> None:
    """Every figure of a logging step, and of the reroutes measured after it, is computed on the device
    (NaN where not defined) and read in one copy: nothing per layer, expert or modality asks the host."""
    for layers in (2, 4):
        assert _step_syncs(layers, True, logging=True) - _step_syncs(layers, True) == 2


def test_a_logging_steps_metrics_reach_the_host_in_one_copy() -> None:
    """host_values, which the callback's loggers and transformers' Trainer use: one sync however many
    metrics (a layer's per-expert figures are views of one vector, as layer_metrics makes them)."""
    per_expert = torch.rand(64, dtype=torch.float64).float()
    metrics = {f"stgc/expert_load/layer_0/expert_{e}": v for e, v in enumerate(per_expert.unbind())}
    metrics["stgc/cel_loss/all"] = torch.tensor(0.5, dtype=torch.float64)
    with HostSyncCounter() as syncs:
        values = host_values(metrics)
    assert syncs.total == 1
    assert values == pytest.approx({name: float(value) for name, value in metrics.items()})
