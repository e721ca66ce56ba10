"""What do FSDP2 and activation checkpointing save? Peak memory per process, and STGC's checkpointed step.

FSDP2 on 2 processes against DDP, activation checkpointing on and off; and STGC's step time with
checkpointing against its floor.

Memory: stage III with STGC (experts and routers train with AdamW) of an LVLM with a 4-expert
top-2 MoE in every other layer, trained for a few steps by Lightning on 2 processes (CPU: gloo),
each variant in fresh processes. A process's figure is its peak during training above what it held
after its imports: CUDA: the allocator's peak; CPU: the peak resident set size (VmHWM), reset when
training starts, i.e. after the model is built and, under FSDP2, sharded (its full copy freed;
blocks of 64 KiB and more are mmap-ed, so freed tensors leave the resident set).
It is printed beside what the parameter counts predict for the weights, gradients and AdamW states
(`model_state_bytes`).

Step time: scripts/bench_stgc.py's Trainer.fit steps (stgc_experiments.bench) on one process, plain and STGC (its configured
callback) alternated, all with checkpointing; the floor is 1 + (E/3) / T, E the experts' forward and backward alone, T the
plain checkpointed step: exact cosines add one product per expert linear (a third of E), and a
recomputed forward adds nothing to capture.

    python scripts/bench_memory.py [--quick]

The last lines print the memory ratios and the step-time ratio with its floor.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.utils.data import DataLoader

from stgc import STGC
from stgc.easy_vqa.prepare import prepare
from stgc.module import LVLMModule
from stgc.moe import moe_layers
from stgc_experiments.bench import (
    StepTimer,
    batch,
    captured_experts,
    experts_time,
    median_ratio,
    model_args,
    round_robin,
    status_bytes,
    to_device,
)

RANKS = 2
DATA = Path(model_args("default")["tokenizer"]).parent  # the bundled easy-vqa data: its tokenizer
SHAPES = {  # LM shape, batch per process (sequences, text tokens)
    # model states dominate: what sharding saves
    "states": ({"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 6}, (2, 32)),
    # activations dominate: what checkpointing saves
    "activations": ({"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 8}, (8, 240)),
}
QUICK = {
    "states": ({"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 4}, (2, 32)),
    "activations": ({"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4}, (8, 120)),
}


def build(lm: dict, checkpointing: bool) -> LVLMModule:
    """Stage III: 4-expert top-2 MoE in every other layer; experts and routers train."""
    torch.manual_seed(0)
    config = {
        "model_type": "qwen2", "num_attention_heads": 8, "num_key_value_heads": 2,
        "max_position_embeddings": 512, **lm,
    }  # fmt: skip
    module = LVLMModule(
        tokenizer=str(DATA / "tokenizer"),
        lm_config=config,
        moe={"num_experts": 4, "top_k": 2},
        trainable=["experts", "routers"],
        gradient_checkpointing=checkpointing,
    )
    for layer in moe_layers(module.model).values():
        torch.nn.init.normal_(layer.router.weight, std=0.05)
    return module


def model_state_bytes(module: LVLMModule, world: int, sharded: bool) -> dict[str, float]:
    """Bytes per process the parameter counts predict (fp32): every weight (4 B) and, per trained
    weight, its gradient (4 B) and AdamW's two moments (8 B); FSDP2 divides all by the world size."""
    total = sum(p.numel() for p in module.parameters())
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    share = 1 / world if sharded else 1.0
    return {"params": total, "trained": trained, "bytes": share * (4 * total + 12 * trained)}


def memory_probe(shape: str, strategy: str, checkpointing: bool, steps: int, quick: bool, out: Path) -> None:
    """One variant on RANKS processes (this is each process's entry point: Lightning relaunches it);
    each process writes its peak memory during training above what it held first (bytes), with the
    parameter counts' prediction, to `out`/rank<r>.json."""
    base = torch.cuda.memory_allocated() if torch.cuda.is_available() else status_bytes("VmRSS")
    lm, (sequences, text_tokens) = (QUICK if quick else SHAPES)[shape]
    module = build(lm, checkpointing)
    data = batch(module, sequences, text_tokens)
    strategies = {
        "ddp": DDPStrategy(find_unused_parameters=True),
        "fsdp2": ModelParallelStrategy(data_parallel_size=RANKS, tensor_parallel_size=1),
    }
    timer = StepTimer()  # after STGC: its setup at the start of training is not in the peak
    trainer = L.Trainer(
        accelerator="auto",
        devices=RANKS,
        strategy=strategies[strategy],
        max_steps=steps,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[STGC(log_every_n_steps=10**9, histogram_every_n_steps=0), timer],
    )
    trainer.fit(module, train_dataloaders=DataLoader([data] * steps, batch_size=None))
    sharded = isinstance(trainer.strategy, ModelParallelStrategy)
    record = {"peak_bytes": timer.peak_bytes - base, **model_state_bytes(module, trainer.world_size, sharded)}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def peak_memory(shape: str, strategy: str, checkpointing: bool, steps: int, quick: bool) -> dict:
    """Run one variant in fresh processes; its ranks' records, and the rank-mean peak (MiB)."""
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, __file__, "--memory-probe", shape, strategy, str(int(checkpointing)),
            str(steps), str(int(quick)), out,
        ]  # fmt: skip
        # large blocks from mmap, given back when freed: the resident set then follows the live tensors
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
        subprocess.run(command, check=True, capture_output=True, text=True, env=env)
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(RANKS)]
    return {
        "peak_mib": statistics.mean(r["peak_bytes"] for r in ranks) / 2**20,
        "predicted_states_mib": ranks[0]["bytes"] / 2**20,
        "params": ranks[0]["params"],
        "trained": ranks[0]["trained"],
    }


def checkpointed_step_ratio(lm: dict, sequences: int, text_tokens: int, reps: int) -> dict:
    """STGC's step time over the plain step, both with checkpointing, and the floor 1 + (E/3)/T."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = build(lm, checkpointing=False).to(device)
    data = to_device(batch(reference, sequences, text_tokens), device)
    # bench_stgc's variants: a plain step, and STGC with conflicts every step (its configured settings)
    variants = ("plain", "stgc_every_step")
    times = round_robin(variants, [build(lm, checkpointing=True) for _ in variants], data, reps)
    experts = captured_experts(reference, data)
    experts_alone = statistics.median(experts_time(experts, device) for _ in range(reps))
    plain = statistics.median(times["plain"])
    return {
        "plain_ms": 1e3 * plain,
        "stgc_ms": 1e3 * statistics.median(times["stgc_every_step"]),
        "ratio": median_ratio(times["stgc_every_step"], times["plain"]),
        "experts_ms": 1e3 * experts_alone,
        "floor": 1 + experts_alone / 3 / plain,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-probe":
        shape, strategy, checkpointing, steps, quick, out = sys.argv[2:]
        memory_probe(shape, strategy, checkpointing == "1", int(steps), quick == "1", Path(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer steps")
    parser.add_argument("--out", default="results/bench_memory.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prepare(DATA)
    shapes = QUICK if args.quick else SHAPES
    steps, reps = (2, 4) if args.quick else (2, 6)
    memory = {}
    print(
        f"{'shape':12} {'strategy':8} {'ckpt':>4} {'peak MiB':>9} {'states MiB':>10} {'params':>11} {'trained':>11}"
    )
    for shape in shapes:
        for strategy in ("ddp", "fsdp2"):
            for checkpointing in (False, True):
                r = peak_memory(shape, strategy, checkpointing, steps, args.quick)
                memory[f"{shape}/{strategy}/{'ckpt' if checkpointing else 'no_ckpt'}"] = r
                print(
                    f"{shape:12} {strategy:8} {'on' if checkpointing else 'off':>4} {r['peak_mib']:9.1f} "
                    f"{r['predicted_states_mib']:10.1f} {r['params']:11,} {r['trained']:11,}"
                )
    lm, (sequences, text_tokens) = shapes["activations"]
    step = checkpointed_step_ratio(lm, sequences, text_tokens, reps)
    ratios = {}
    for shape in shapes:
        for ckpt in ("no_ckpt", "ckpt"):
            fsdp2, ddp = memory[f"{shape}/fsdp2/{ckpt}"], memory[f"{shape}/ddp/{ckpt}"]
            ratios[f"{shape}: fsdp2 / ddp, {ckpt}"] = fsdp2["peak_mib"] / ddp["peak_mib"]
        for strategy in ("ddp", "fsdp2"):
            on, off = memory[f"{shape}/{strategy}/ckpt"], memory[f"{shape}/{strategy}/no_ckpt"]
            ratios[f"{shape}: checkpointing on / off, {strategy}"] = on["peak_mib"] / off["peak_mib"]
    for name, value in ratios.items():
        print(f"peak memory per process, {name}: {value:.3f}")
    print(
        f"STGC step / plain step, both checkpointed: {step['ratio']:.3f} (floor {step['floor']:.3f}; "
        f"plain {step['plain_ms']:.1f} ms, STGC {step['stgc_ms']:.1f} ms, experts alone {step['experts_ms']:.1f} ms)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    record = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "quick": args.quick,
        "shapes": {k: {"lm": v[0], "batch_per_process": v[1]} for k, v in shapes.items()},
        "memory": memory,
        "ratios": ratios,
        "checkpointed_step": step,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
