"""A few minutes on a GPU: does stage III + STGC behave there?

Prints, per precision (bf16-mixed, 16-mixed):

  * the step-time ratio STGC / plain against its floor, measured (a step with only the extra product exact
    cosines need, stgc_experiments.bench.ProductFloor) and estimated (1 + s/3, s = the experts' share of a
    plain step),
    and those of gradient="output" and of a step that logs (as scripts/bench_stgc.py measures them),
  * host-device syncs per training step with and without STGC (counted; on CUDA also seen by
    torch.cuda's sync debug mode),
  * peak GPU memory with and without STGC,
  * the largest cosine error of STGC's low-precision terms against float64 on one step's captures;

and then the operators STGC runs per MoE layer per step on transformers' fused experts (a tiny
Qwen3-MoE at 8 and 64 experts: they should not grow with the experts), and a tiny Qwen3-VL-MoE of
configs/vlm/qwen3_vl_moe_tiny.yaml under bf16 autocast (its grouped experts on the GPU: finite terms).

Every run is a real `Trainer.fit` of LVLMModule (the easy-vqa model's shape, stage III's MoE) with the
STGC callback as users add it, on synthetic stage III batches.

    python scripts/gpu_check.py              # on a GPU: under 3 minutes
    python scripts/gpu_check.py --tiny       # a tiny model on the CPU (bf16 only), as the tests run it
"""

import argparse
import functools
import json
import statistics
import warnings
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset
from transformers import AutoConfig, AutoModelForImageTextToText

from stgc import STGC
from stgc.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from stgc.easy_vqa.prepare import prepare
from stgc.host_syncs import HostSyncCounter
from stgc.method.cosine import cosine_from_terms, linear_gradient_terms
from stgc.module import LVLMModule
from stgc.moe import moe_layers
from stgc.moe.experts import expert_linears
from stgc_experiments.bench import (
    ProductFloor,
    StepTimer,
    captured_experts,
    experts_time,
    layer_operators,
    method_layer_operators,
    method_profile,
    timed,
    tiny_qwen3_moe,
    tiny_sparse_moe,
)

CONFIGS = Path("configs/easy_vqa")
VLM_CONFIG = Path("configs/vlm/qwen3_vl_moe_tiny.yaml")
TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


class StageThreeBatches(Dataset):
    """Fixed stage III-shaped samples: image positions, then text trained everywhere."""

    def __init__(self, module: LVLMModule, count: int, text_tokens: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.text = torch.randint(4, len(module.tokenizer), (count, text_tokens), generator=generator)
        self.images = torch.randn(count, 3, 64, 64, generator=generator)
        self.num_image_tokens = module.num_image_tokens

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.cat([torch.full((self.num_image_tokens,), IMAGE_TOKEN_ID), self.text[index]])
        return {
            "images": self.images[index],
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": ids.masked_fill(ids == IMAGE_TOKEN_ID, IGNORE_INDEX),
        }


def build(tiny: bool, data: Path) -> LVLMModule:
    """Stage III of configs/easy_vqa: its LM (or a tiny one) upcycled as stage3_moe.yaml says."""
    torch.manual_seed(0)
    model = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model.yaml").model.init_args)
    model["tokenizer"] = str(data / "tokenizer")
    stage3 = OmegaConf.to_container(OmegaConf.load(CONFIGS / "stage3_moe.yaml").model.init_args)
    if tiny:
        model["lm_config"] |= TINY_LM
    module = LVLMModule(
        **model, moe=stage3["moe"], trainable=stage3["trainable"], router_aux_loss_coef=0.01, lr=1e-4
    )
    for layer in moe_layers(module.model).values():  # trained routers are not uniform
        torch.nn.init.normal_(layer.router.weight, std=0.05)
    return module


class StepProbe(StepTimer):
    """StepTimer's step times and memory peak, and the host syncs of the step `count_at` from its start to
    its batch-end hook (on CUDA also the warnings of torch.cuda's sync debug mode)."""

    def __init__(self, count_at: int) -> None:
        super().__init__()
        self.count_at = count_at
        self.syncs: int | None = None
        self.cuda_sync_warnings: int | None = None
        self._counter: HostSyncCounter | None = None
        self._warnings = None
        self._caught: list[warnings.WarningMessage] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if batch_idx == self.count_at:
            self._counter = HostSyncCounter().__enter__()
            if torch.cuda.is_available():
                self._warnings = warnings.catch_warnings(record=True)
                self._caught = self._warnings.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.syncs, self._counter = self._counter.total, None
            if self._warnings is not None:
                torch.cuda.set_sync_debug_mode("default")
                self._warnings.__exit__(None, None, None)
                self.cuda_sync_warnings = sum("synchroniz" in str(w.message) for w in self._caught)
                self._warnings = None


def fit(
    args: argparse.Namespace,
    precision: str,
    stgc: dict | None,
    batch_size: int,
    text_tokens: int,
    floor: bool = False,
) -> dict:
    """`args.steps` training steps (after 2 warm-up steps) of one variant (plain, the product floor, or
    STGC with the arguments `stgc` changes); its times, syncs, peak memory."""
    steps = args.steps
    module = build(args.tiny, args.data)
    probe = StepProbe(count_at=3)
    callbacks = [probe, ProductFloor()] if floor else [probe]
    if stgc is not None:
        callbacks.append(STGC(**{"log_every_n_steps": 10**6, "histogram_every_n_steps": 0} | stgc))
    data = DataLoader(StageThreeBatches(module, batch_size * (steps + 2), text_tokens), batch_size=batch_size)
    trainer = L.Trainer(
        accelerator="auto", devices=1, precision=precision, max_steps=steps + 2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, data)
    return {
        "step_ms": 1e3 * statistics.median(probe.times[2:]),
        "syncs_per_step": probe.syncs,
        "cuda_sync_warnings": probe.cuda_sync_warnings,
        "peak_mib": probe.peak_bytes / 2**20 if torch.cuda.is_available() else None,
        "module": module,
        "batch": next(iter(data)),
    }


def _on_device(module: LVLMModule, batch: dict, precision: str) -> tuple[torch.device, torch.dtype, dict]:
    """The module's device, the autocast dtype of `precision`, and the batch moved to that device."""
    device = next(module.parameters()).device
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    return device, dtype, {k: v.to(device) for k, v in batch.items()}


def experts_share(module: LVLMModule, batch: dict, precision: str) -> float:
    """s: the experts' forward + backward alone, on the rows they got in a step, over that plain step."""
    device, dtype, batch = _on_device(module, batch, precision)
    calls = captured_experts(module, batch, dtype)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype):
            total = module(batch).loss
        total.backward()

    timings = {}
    for name, fn in (("step", step), ("experts", lambda: experts_time(calls, device, dtype))):
        fn()  # warm up
        timings[name] = statistics.median(timed(fn, device) for _ in range(5))
    module.zero_grad(set_to_none=True)
    return timings["experts"] / timings["step"]


def cosine_error(module: LVLMModule, batch: dict, precision: str) -> float:
    """STGC's terms from one step's low-precision captures (X, Δ of the linears of the first MoE layer's
    busiest expert, as autocast left them) against the same terms in float64."""
    device, dtype, batch = _on_device(module, batch, precision)
    layer = next(iter(moe_layers(module.model).values()))
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        module(batch)
    busiest = max(range(layer.num_experts), key=lambda e: len(layer.last_routing.expert_rows[e]))
    linears = expert_linears(layer.experts)  # every expert's rows; the busiest expert's are taken below
    inputs, outputs = [], []

    def keep(module, args, output) -> None:
        inputs.append(args[0])
        outputs.append(output)

    hooks = [linear.register_forward_hook(keep) for linear in linears]
    with torch.autocast(device.type, dtype=dtype):
        loss = module(batch).loss
    for hook in hooks:
        hook.remove()
    deltas = torch.autograd.grad(loss, outputs)
    sizes = layer.last_routing.groups.sizes
    inputs, deltas = ([t.split(sizes)[busiest] for t in ts] for ts in (inputs, deltas))
    low = [linear_gradient_terms(x.detach(), d) for x, d in zip(inputs, deltas, strict=True)]
    high = [
        linear_gradient_terms(x.detach().double(), d.double()) for x, d in zip(inputs, deltas, strict=True)
    ]

    def cosine(terms):
        return cosine_from_terms(*(sum(t[i] for t in terms) for i in range(3)))

    return float((cosine(low).double() - cosine(high)).abs().max())


def operators_per_layer(tiny: bool) -> dict:
    """STGC's operators per MoE layer per step (and a logging step's after backward) on a tiny Qwen3-MoE
    (transformers' fused experts) and a tiny upcycled Qwen2 (this project's SparseMoE) at 8 and 64
    experts, and a tiny Qwen3-VL-MoE (configs/vlm/qwen3_vl_moe_tiny.yaml's model) under bf16 autocast: its
    operators and whether every step's terms were finite. On the GPU when there is one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {}
    for experts in (8,) if tiny else (8, 64):
        for name, model in (("qwen3_moe", tiny_qwen3_moe), ("sparse_moe", tiny_sparse_moe)):
            report[f"{name}_{experts}_experts"] = method_layer_operators(
                functools.partial(model, experts), device
            )
    config = OmegaConf.to_container(OmegaConf.load(VLM_CONFIG).model.init_args.model_config)
    model_type = config.pop("model_type")
    config["text_config"] |= {"vocab_size": 256}  # text only: the processor's ids are not needed
    vlm = AutoModelForImageTextToText.from_config(AutoConfig.for_model(model_type, **config)).to(device)
    profile = method_profile(vlm, autocast=torch.bfloat16)
    layers = vlm.config.text_config.num_hidden_layers
    report["qwen3_vl_moe_tiny_bf16"] = layer_operators(profile["parts"], layers) | {
        "finite": profile["finite"]
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny LM and small batches (CPU, the tests)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 20, tiny 3)")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    parser.add_argument("--data", type=Path, default=Path("data/easy_vqa"), help="prepared easy-vqa folder")
    args = parser.parse_args()
    prepare(args.data)  # the easy-vqa tokenizer (idempotent)
    args.steps = args.steps or (3 if args.tiny else 20)
    batch_size, text_tokens = (4, 24) if args.tiny else (32, 150)
    precisions = ["bf16-mixed", "16-mixed"] if torch.cuda.is_available() else ["bf16-mixed"]
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for precision in precisions:
        plain = fit(args, precision, None, batch_size, text_tokens)
        floor = fit(args, precision, None, batch_size, text_tokens, floor=True)
        stgc = fit(args, precision, {}, batch_size, text_tokens)
        output = fit(args, precision, {"gradient": "output"}, batch_size, text_tokens)
        logging = fit(args, precision, {"log_every_n_steps": 1}, batch_size, text_tokens)
        share = experts_share(plain["module"], plain["batch"], precision)
        row = {
            "plain_step_ms": plain["step_ms"],
            "stgc_step_ms": stgc["step_ms"],
            "ratio": stgc["step_ms"] / plain["step_ms"],
            "ratio_output": output["step_ms"] / plain["step_ms"],
            "ratio_logging": logging["step_ms"] / plain["step_ms"],
            "floor": floor["step_ms"] / plain["step_ms"],
            "experts_share_s": share,
            "floor_estimate": 1 + share / 3,
            "syncs_per_step": {"plain": plain["syncs_per_step"], "stgc": stgc["syncs_per_step"]},
            "cuda_sync_warnings": {"plain": plain["cuda_sync_warnings"], "stgc": stgc["cuda_sync_warnings"]},
            "peak_mib": {"plain": plain["peak_mib"], "stgc": stgc["peak_mib"]},
            "cosine_max_abs_error_vs_fp64": cosine_error(stgc["module"], stgc["batch"], precision),
        }
        report[precision] = row
        print(f"[{precision}] {json.dumps(row)}", flush=True)
    report["operators_per_layer"] = operators_per_layer(args.tiny)
    print(f"[operators per MoE layer] {json.dumps(report['operators_per_layer'])}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
