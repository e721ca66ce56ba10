"""Train a tiny upcycled LM with STGC under DDP on 2 CPU processes (gloo); each rank saves its weights.

python tests/support/ddp_stgc.py OUT_DIR [--no-reduce]   (--no-reduce: skip STGC's all-reduce, a control)
"""

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stgc.callback import STGC  # noqa: E402
from support.lightning_models import CausalLMModule, upcycled_qwen2  # noqa: E402


class NoReduceSTGC(STGC):
    def _average_across_processes(self, trainer, router_grad):
        return router_grad


def main() -> None:
    out_dir = Path(sys.argv[1])
    callback = (NoReduceSTGC if "--no-reduce" in sys.argv else STGC)(
        loss_weight=1.0,
        threshold=0.0,
        histogram_every_n_steps=0,  # τ = 0: this tiny model has conflicts
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
    module = CausalLMModule(upcycled_qwen2())
    trainer.fit(module)
    torch.save(
        {"state_dict": module.state_dict(), "measured": callback.measured_micro_batches},
        out_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
