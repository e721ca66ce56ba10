"""stgc_experiments.bench, which the benchmarks share: StepTimer (a time and the page faults per training
step, and the memory peak of training), the measured floor of exact cosines, and the paired statistics."""

import time

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from stgc import STGC
from stgc.module import LVLMModule
from stgc.moe import moe_layers
from stgc.moe.experts import expert_linears
from stgc_experiments.bench import (
    TURN,
    ProductFloor,
    StepTimer,
    batch,
    median_ratio,
    paired_excess,
    tiny_sparse_moe,
    turn_steps,
)
from support.lightning_models import CausalLMModule, cpu_trainer, upcycled_qwen2
from support.tiny import TINY_LM


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


class SlowBatchEnd(L.Callback):
    """Work after the optimizer step, in a batch-end hook that runs after the timer's."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(0.05)


def test_a_step_time_holds_the_batch_end_hooks_of_the_callbacks_after_the_timer() -> None:
    timer = StepTimer()
    trainer = L.Trainer(
        devices=1, max_steps=3, callbacks=[timer, SlowBatchEnd()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(BoringModel())
    assert len(timer.times) == 3 and min(timer.times) >= 0.05  # the last step's too


def grouped_products(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """The grouped products that one forward and backward of `model` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(event.count for event in profiler.key_averages() if event.key == "aten::_grouped_mm")


def test_product_floor_adds_one_grouped_product_per_expert_linear_and_nothing_once_torn_down() -> None:
    model = tiny_sparse_moe(num_experts=4)
    ids = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(0))
    linears = sum(len(expert_linears(layer.experts)) for layer in moe_layers(model).values())  # 2 x 3
    plain = grouped_products(model, ids)
    floor = ProductFloor()
    floor.setup(None, model, "fit")
    with_floor = grouped_products(model, ids)
    floor.teardown(None, model, "fit")
    assert linears == 6 and with_floor - plain == linears
    assert grouped_products(model, ids) == plain


def test_paired_excess_is_the_median_with_order_statistics_around_it() -> None:
    plain, floor = [1.0] * 8, [1.0] * 8
    times = [1.0 + k / 64 for k in (5, 1, 8, 2, 7, 3, 6, 4)]  # excess 1/64 .. 8/64, exact in binary
    excess = paired_excess(times, floor, plain)
    # 8 repetitions: P(Binomial(8, 1/2) <= 1) = 9/256 <= 5% < P(<= 2): the 2nd and the 7th of the sorted ones
    assert excess["median"] == 4.5 / 64 and (excess["low"], excess["high"]) == (2 / 64, 7 / 64)
    few = paired_excess(times[:4], floor[:4], plain[:4])  # too few for 90%: their whole range
    assert (few["low"], few["high"]) == (1 / 64, 8 / 64)


def test_product_floor_with_a_period_runs_on_its_phase_only() -> None:
    """In a fit of 6 steps, ProductFloor(3, phase=1) adds its products on steps 1 and 4 alone."""

    def grouped_products_of_fit(callbacks: list) -> int:
        module = CausalLMModule(upcycled_qwen2())
        trainer = cpu_trainer(callbacks, max_steps=6)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            trainer.fit(module)
        return sum(event.count for event in profiler.key_averages() if event.key == "aten::_grouped_mm")

    linears = sum(len(expert_linears(layer.experts)) for layer in moe_layers(upcycled_qwen2()).values())
    plain = grouped_products_of_fit([])
    assert grouped_products_of_fit([ProductFloor(period=3, phase=1)]) - plain == 2 * linears
    assert grouped_products_of_fit([ProductFloor()]) - plain == 6 * linears


def test_turn_steps_times_each_kind_of_step_and_runs_stgc_on_its_turns_only(
    easy_vqa_dir, monkeypatch
) -> None:
    """Two timed turns after one untimed: 9 steps of one fit, STGC measuring steps 2, 5 and 8 alone."""
    measured_at = []  # the global steps whose micro-batch STGC measured
    on_after_backward = STGC.on_after_backward

    def watched(callback, trainer, pl_module):
        if callback.method.capturing:
            measured_at.append(trainer.global_step)
        on_after_backward(callback, trainer, pl_module)

    monkeypatch.setattr(STGC, "on_after_backward", watched)
    torch.manual_seed(0)
    module = LVLMModule(
        tokenizer=str(easy_vqa_dir / "tokenizer"), lm_config=TINY_LM, trainable=["experts", "routers"],
        moe={"num_experts": 4, "top_k": 2, "layers": "all"},
    )  # fmt: skip
    times = turn_steps(module, batch(module, 2, 6), "stgc_every_step", turns=2)
    assert list(times) == list(TURN) and all(len(kind) == 2 for kind in times.values())
    assert all(seconds > 0 for kind in times.values() for seconds in kind)
    assert measured_at == [2, 5, 8]
