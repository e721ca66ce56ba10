"""Tiny LightningModules around transformers MoE LMs, for the STGC callback tests.

`ForeignMoEModule` is deliberately NOT this project's module: it wraps a transformers MoE model
(OLMoE) the way any user's code would, to show STGC plugs in with nothing else changed.
"""

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import OlmoeConfig, OlmoeForCausalLM, Qwen2Config, Qwen2ForCausalLM

from stgc.moe import SparseMoE, moe_losses, upcycle

VOCAB = 64


def cpu_trainer(callbacks: list, **kwargs) -> L.Trainer:
    """A CPU Trainer for callback tests: no logger, checkpoints, progress bar or summary; logs every step."""
    defaults = dict(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    return L.Trainer(callbacks=callbacks, **(defaults | kwargs))


def token_batches(num_samples: int = 16, length: int = 12, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (num_samples, length), generator=generator)
    return DataLoader(TensorDataset(ids), batch_size=4)


class CausalLMModule(L.LightningModule):
    """Next-token training of a causal LM on random ids, with plain SGD (easy to reason about)."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.1, aux_coef: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.aux_coef = aux_coef

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        if self.aux_coef:
            loss = loss + self.aux_coef * moe_losses(self.model)[0]
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return token_batches()


def upcycled_qwen2(seed: int = 0, num_experts: int = 4, top_k: int = 2) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = Qwen2ForCausalLM(config)
    upcycle(model, num_experts=num_experts, top_k=top_k, layers="all")
    for layer in model.model.layers:  # break the experts' symmetry so routing matters
        torch.nn.init.normal_(layer.mlp.router.weight, std=0.5)
        for parameter in layer.mlp.experts.parameters():  # (E, ...) fused: every expert's own noise
            parameter.data.add_(0.02 * torch.randn_like(parameter))
    return model


def tiny_olmoe(seed: int = 0) -> OlmoeForCausalLM:
    torch.manual_seed(seed)
    config = OlmoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = OlmoeForCausalLM(config)
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.mlp.gate.weight, std=0.5)
    return model


class ForeignMoEModule(CausalLMModule):
    """A user's LightningModule around a transformers MoE model; knows nothing of STGC."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(tiny_olmoe(seed))


class OppositeGroups(L.LightningModule):
    """Eight identical tokens through one MoE layer; six pull an expert one way, two the other."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
        self.moe = SparseMoE(mlp, hidden_size=4, num_experts=2, top_k=1)
        self.token = torch.randn(4)
        self.direction = torch.randn(4)
        self.sign = torch.tensor([1.0] * 6 + [-1.0] * 2)  # tokens 6 and 7 are the minority

    def training_step(self, batch, batch_idx):
        out = self.moe(self.token.expand(1, 8, 4))  # (1, 8, 4)
        return (out[0] * self.sign[:, None] * self.direction).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)

    def expert_probability(self) -> torch.Tensor:
        logits = self.moe.router(self.token)
        return logits.softmax(-1)
