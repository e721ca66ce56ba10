"""stgc_experiments.bench's StepTimer, which the benchmarks share: a time and the page faults per training
step, and the memory peak of training."""

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

from stgc_experiments.bench import StepTimer, median_ratio


def test_step_timer_times_every_training_step_and_keeps_the_memory_peak() -> None:
    timer = StepTimer()
    trainer = L.Trainer(
        devices=1, max_steps=3, callbacks=[timer], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(BoringModel())
    assert len(timer.times) == 3 and all(seconds > 0 for seconds in timer.times)
    assert len(timer.faults) == 3 and all(faults >= 0 for faults in timer.faults)
    assert timer.peak_bytes > 0  # the model's weights at least: CUDA's allocator, else the resident set
    assert median_ratio([2.0, 3.0, 10.0], [1.0, 1.0, 2.0]) == 3.0
