"""Train a tiny upcycled LM with STGC under DDP on 2 CPU processes (gloo); each rank saves its weights.

python tests/support/ddp_stgc.py OUT_DIR [--no-reduce] [--nan-on-one-rank]
  --no-reduce: skip STGC's all-reduce (a control);
  --nan-on-one-rank: rank 1's loss is NaN at step 1, rank 0's stays finite.
"""

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stgc.callback import STGC  # noqa: E402
from stgc.method import core  # noqa: E402
from stgc.optim import SkipsBadSteps  # noqa: E402
from support.lightning_models import CausalLMModule, upcycled_qwen2  # noqa: E402


class NaNOnOneRank(SkipsBadSteps, CausalLMModule):
    """Only rank 1 sees a non-finite loss at step 1; the non-finite step is skipped as in LVLMModule."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_rank == 1 and batch_idx == 1 else loss


def main() -> None:
    out_dir = Path(sys.argv[1])
    if "--no-reduce" in sys.argv:  # the control: STGC's reductions over the ranks left out
        core.mean_over_ranks = core.sum_over_ranks = lambda values: values
    callback = STGC(
        loss_weight=1.0,
        threshold=0.0,
        histogram_every_n_steps=0,  # τ = 0: this tiny model has conflicts
        log_every_n_steps=1,  # every step enters the statistics' all-reduce too
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    module = (NaNOnOneRank if "--nan-on-one-rank" in sys.argv else CausalLMModule)(upcycled_qwen2())
    trainer.fit(module)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "measured": callback.method.measured_micro_batches,
            "skipped_nonfinite": callback.method.skipped_nonfinite,
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
