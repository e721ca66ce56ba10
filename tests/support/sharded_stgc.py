"""Train the tiny upcycled LM (float64) with STGC for 5 steps of one fixed global batch each (2 × 4
sequences), and save what STGC saw at every micro-batch and the final weights.

python tests/support/sharded_stgc.py OUT_DIR {single,ddp,fsdp2} [--checkpointing] [--hf-experts]
  single: one process; each global batch is 2 accumulated micro-batches, rank 0's half then rank 1's
  ddp, fsdp2: 2 CPU processes (gloo); rank r trains on half r of each global batch
  --checkpointing: recompute the decoder layers in backward (non-reentrant, stgc's context_fn)
  --hf-experts: OLMoE's fused transformers experts instead of upcycled SparseMoE layers
  --family NAME: a tiny model of support.moe_vlms.FAMILIES instead (e.g. glm4v_moe: a sigmoid router)
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stgc.callback import STGC  # noqa: E402
from stgc.moe.recompute import enable_gradient_checkpointing  # noqa: E402
from stgc.moe.upcycle import decoder_layers  # noqa: E402
from support.lightning_models import VOCAB, CausalLMModule, tiny_olmoe, upcycled_qwen2  # noqa: E402
from support.moe_vlms import FAMILIES  # noqa: E402
from support.ranks import full_state_dict  # noqa: E402

STEPS, RANKS, PER_RANK, LENGTH = 5, 2, 4, 12
THRESHOLD = 0.0  # the tiny model has conflicts at τ = 0


def global_batches() -> torch.Tensor:
    """(STEPS, RANKS, PER_RANK, LENGTH) token ids: step s's global batch, split into the ranks' halves."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (STEPS, RANKS, PER_RANK, LENGTH), generator=generator)


class RecordingSTGC(STGC):
    """STGC that also keeps every micro-batch's cosines of every layer."""

    def __init__(self) -> None:
        super().__init__(threshold=THRESHOLD, loss_weight=1.0, histogram_every_n_steps=0, log_every_n_steps=1)
        self.seen: list[dict] = []  # one entry per (micro-batch, layer)

    def _attach(self, pl_module: L.LightningModule) -> None:
        super()._attach(pl_module)
        for probe in self.method.probes:
            probe.conflicts = self._recorded(probe.conflicts)

    def _recorded(self, conflicts):
        def recorded(*args, **kwargs):
            layer = conflicts(*args, **kwargs)
            self.seen.append(
                {
                    "cosine": layer.cosine.detach().clone(),
                    "rows": layer.rows.clone(),
                    "expert": layer.expert.clone(),
                    "has_grad": layer.has_grad.clone(),
                }
            )
            return layer

        return recorded


class GlobalBatchModule(CausalLMModule):
    """Each process trains on its own half of every global batch (or on both halves, one after the
    other, when alone); FSDP2 shards each decoder layer and the whole model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model.double())

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in decoder_layers(self.model):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def train_dataloader(self) -> DataLoader:
        batches = global_batches()
        if self.trainer.world_size == 1:
            return DataLoader(list(batches.reshape(STEPS * RANKS, PER_RANK, LENGTH)), batch_size=None)
        return DataLoader(list(batches[:, self.global_rank]), batch_size=None)

    def training_step(self, batch, batch_idx):
        return super().training_step((batch,), batch_idx)


def main() -> None:
    out_dir, mode = Path(sys.argv[1]), sys.argv[2]
    model = tiny_olmoe() if "--hf-experts" in sys.argv else upcycled_qwen2()
    if "--family" in sys.argv:
        torch.manual_seed(0)
        model = FAMILIES[sys.argv[sys.argv.index("--family") + 1]][0]()
    if "--checkpointing" in sys.argv:
        enable_gradient_checkpointing(model)
    strategies = {
        "single": "auto",
        # a VLM's vision tower gets no gradient from text-only batches
        "ddp": "ddp_find_unused_parameters_true" if "--family" in sys.argv else "ddp",
        "fsdp2": ModelParallelStrategy(data_parallel_size=RANKS, tensor_parallel_size=1),
    }
    callback = RecordingSTGC()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1 if mode == "single" else RANKS,
        strategy=strategies[mode],
        max_steps=STEPS,
        accumulate_grad_batches=RANKS if mode == "single" else 1,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    module = GlobalBatchModule(model)
    trainer.fit(module)
    state = full_state_dict(module)
    torch.save(
        {
            "seen": callback.seen,
            "conflict_counts": callback.method.conflict_counts.cpu(),
            "assignment_counts": callback.method.assignment_counts.cpu(),
            "state_dict": state,
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
