"""The method's core runs outside Lightning: transformers' Trainer (stgc.integrations.transformers) makes
the same update as the Lightning callback, whose cosines test_callback checks against brute force."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import TrainingArguments

from stgc.callback import STGC
from stgc.integrations.transformers import STGCTrainer
from stgc.method import STGCMethod
from support.lightning_models import VOCAB, CausalLMModule, tiny_olmoe, upcycled_qwen2

SETTINGS = {"threshold": 0.0, "loss_type": "unlikelihood"}  # τ = 0: the tiny random model has conflicts
LR = 0.1


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(3))


def _hf_step(tmp_path, loss_weight: float) -> tuple[torch.nn.Module, list[dict]]:
    """One SGD step of transformers' Trainer with STGC over one batch of all 8 sequences."""
    model = tiny_olmoe()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"hf_{loss_weight}"), max_steps=1, per_device_train_batch_size=8,
        optim="sgd", learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    data = [{"input_ids": ids, "labels": ids} for ids in _ids()]
    stgc = STGCMethod(loss_weight=loss_weight, **SETTINGS)
    trainer = STGCTrainer(model=model, args=args, train_dataset=data, stgc=stgc)
    trainer.train()
    return model, trainer.state.log_history


def _lightning_step(loss_weight: float) -> torch.nn.Module:
    """The same step through the Lightning callback."""
    module = CausalLMModule(tiny_olmoe(), lr=LR)
    module.train_dataloader = lambda: DataLoader(TensorDataset(_ids()), batch_size=8)
    callback = STGC(loss_weight=loss_weight, histogram_every_n_steps=0, **SETTINGS)
    L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback],
    ).fit(module)  # fmt: skip
    return module.model


def _routers(model: torch.nn.Module) -> list[torch.Tensor]:
    return [layer.mlp.gate.weight for layer in model.model.layers]


def test_transformers_trainer_makes_the_lightning_callbacks_update_and_logs_its_metrics(tmp_path) -> None:
    hf_model, history = _hf_step(tmp_path, loss_weight=1.0)
    lightning_model = _lightning_step(loss_weight=1.0)
    for (name, a), b in zip(hf_model.named_parameters(), lightning_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    (logged,) = [entry for entry in history if "loss" in entry]
    assert 0.0 < logged["stgc/conflict_ratio/all"] < 1.0
    assert {"stgc/cel_loss/all", "stgc/cosine_mean/all", "stgc/expert_drift/layer_0"} <= set(logged)
    measuring, _ = _hf_step(tmp_path, loss_weight=0.0)  # λ = 0: only the routers differ, by the CEL's step
    moved = [
        not torch.allclose(a, b, atol=1e-6)
        for a, b in zip(_routers(measuring), _routers(hf_model), strict=True)
    ]
    assert all(moved)
    routers = {id(p) for p in _routers(hf_model)}
    for a, b in zip(measuring.parameters(), hf_model.parameters(), strict=True):
        if id(b) not in routers:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _plain_loop_router_grads(loss_type, loss_weight: float = 1.0) -> list[torch.Tensor]:
    """One backward of a plain PyTorch loop with the core, and the routers' gradients it leaves."""
    model = upcycled_qwen2()
    stgc = STGCMethod(threshold=0.0, loss_weight=loss_weight, loss_type=loss_type)
    stgc.attach(model)
    ids = _ids()
    stgc.begin(ids)
    model(input_ids=ids, labels=ids).loss.backward()
    result = stgc.after_backward(logging=True)
    assert result.finite and result.metrics["stgc/conflict_ratio/all"] > 0
    return [layer.mlp.router.weight.grad.clone() for layer in model.model.layers]


def test_a_loss_form_of_ones_own_runs_in_a_plain_loop() -> None:
    """-log(1 - p_te) averaged over the flagged pairs, written here from the softmax, is the built-in
    unlikelihood form: the same router gradients."""

    def unlikelihood(router_logits, rows, experts, flagged):
        p = router_logits.softmax(-1)[rows, experts]  # (P,)
        return -(torch.log1p(-p) * flagged).sum() / flagged.sum().clamp(min=1)

    own, built_in = _plain_loop_router_grads(unlikelihood), _plain_loop_router_grads("unlikelihood")
    for a, b in zip(own, built_in, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    measuring = _plain_loop_router_grads("unlikelihood", loss_weight=0.0)  # the LM's gradient alone
    assert all(not torch.allclose(a, b, atol=1e-6) for a, b in zip(measuring, built_in, strict=True))


IMAGE_ID = 5  # stands in for a VLM's image token in these text models


def _image_share(result, ids: torch.Tensor) -> float:
    """Brute force over the result's assignments: the flagged share of those at image positions."""
    is_image = ids.reshape(-1) == IMAGE_ID
    flagged = image = 0
    for layer in result.layers:
        at_image = is_image[layer.rows] & layer.has_grad  # rows are the B*T positions
        flagged += int((at_image & (layer.cosine < 0.0)).sum())
        image += int(at_image.sum())
    return flagged / image


def test_the_modality_of_transformers_experts_comes_from_the_configs_image_token_id() -> None:
    model = tiny_olmoe()
    model.config.image_token_id = IMAGE_ID  # as a VLM's config names it
    stgc = STGCMethod(threshold=0.0, loss_weight=0.0)
    stgc.attach(model)
    assert stgc.image_token_ids == [IMAGE_ID]
    ids = _ids()
    ids[:, :4] = IMAGE_ID  # each sequence opens with 4 image positions
    stgc.begin({"input_ids": ids})
    model(input_ids=ids, labels=ids).loss.backward()
    result = stgc.after_backward(logging=True)
    logged = result.metrics["stgc/conflict_ratio_image/all"]
    assert float(logged) == pytest.approx(_image_share(result, ids))
    assert "stgc/conflict_ratio_text/layer_0" in result.metrics


class SaysModality(CausalLMModule):
    """A LightningModule that gives each position's modality itself (stgc.method.modality.TokenModality)."""

    def token_modality(self, batch):
        (ids,) = batch
        return (ids == IMAGE_ID).long()


def test_a_lightning_module_can_supply_the_modality() -> None:
    module = SaysModality(tiny_olmoe(), lr=LR)
    ids = _ids()
    ids[:, :4] = IMAGE_ID
    module.train_dataloader = lambda: DataLoader(TensorDataset(ids), batch_size=8)
    callback = STGC(loss_weight=0.0, threshold=0.0, histogram_every_n_steps=0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(module)
    metrics = trainer.callback_metrics
    assert {"stgc/conflict_ratio_image/all", "stgc/conflict_ratio_text/all"} <= set(metrics)
    assert 0.0 <= float(metrics["stgc/conflict_ratio_image/all"]) <= 1.0
