"""Plug STGC into a Lightning model that is not ours: a tiny OLMoE (transformers) language model.

    python examples/olmoe_with_stgc.py

The LightningModule below knows nothing about STGC; the callback finds the MoE layers itself.
"""

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import OlmoeConfig, OlmoeForCausalLM

from stgc import STGC


class LanguageModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = OlmoeConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=4,
            num_experts_per_tok=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        self.model = OlmoeForCausalLM(config)

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        tokens = torch.randint(0, 128, (64, 16), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(tokens), batch_size=8)


def main() -> dict[str, float]:
    trainer = L.Trainer(
        max_steps=8,
        log_every_n_steps=2,
        logger=False,
        enable_checkpointing=False,
        callbacks=[STGC(threshold=-0.1, loss_weight=0.01)],
    )
    trainer.fit(LanguageModel())
    stats = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("/all")}
    print(stats)
    return stats


if __name__ == "__main__":
    main()
