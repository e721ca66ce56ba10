"""Benchmark SparseMoE fwd+bwd on CPU against transformers' MixtralExperts (eager) and k x dense MLP.

All contenders see the same input and output gradient; MixtralExperts is fed SparseMoE's routing
(same top-k indices and weights) and its fused weights are copied from SparseMoE's experts.
SparseMoE's time includes its router, losses and dispatch; MixtralExperts' excludes routing.
Contenders are interleaved (one repetition of each, in rotating order) after warmup.

    .venv/bin/python scripts/bench_moe.py [--quick] [--out results/bench_moe.json]
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from transformers import MixtralConfig, Qwen2Config
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from stgc.moe import SparseMoE

SHAPES = [  # (hidden, intermediate, tokens)
    (256, 688, 3200),
    (512, 1376, 4096),
]


def mixtral_from(moe: SparseMoE, intermediate: int) -> MixtralExperts:
    """MixtralExperts (eager) whose fused weights are copies of `moe`'s Qwen2MLP experts."""
    hidden = moe.router.in_features
    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_local_experts=moe.num_experts,
        hidden_act="silu",
    )
    config._experts_implementation = "eager"
    mixtral = MixtralExperts(config)
    with torch.no_grad():
        experts = moe.experts  # fused: (E, I, H) gate and up, (E, H, I) down
        mixtral.gate_up_proj.copy_(torch.cat([experts.gate_proj.weight, experts.up_proj.weight], dim=1))
        mixtral.down_proj.copy_(experts.down_proj.weight)
    return mixtral


def contenders(hidden: int, intermediate: int, tokens: int, top_k: int) -> dict[str, Callable[[], None]]:
    """One fwd+bwd closure per contender, on shared input, output gradient and routing."""
    config = Qwen2Config(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu")
    dense = Qwen2MLP(config)
    moe = SparseMoE(dense, hidden, num_experts=4, top_k=top_k)
    mixtral = mixtral_from(moe, intermediate)
    x = torch.randn(tokens, hidden, requires_grad=True)  # (N, H)
    grad_out = torch.randn(tokens, hidden)  # (N, H)
    with torch.no_grad():
        moe(x)
    topk_index = moe.last_routing.topk_index  # (N, k)
    topk_weight = moe.last_routing.topk_weight.detach().clone().requires_grad_()  # (N, k)
    params = [x, topk_weight, *moe.parameters(), *mixtral.parameters(), *dense.parameters()]

    def run(fn: Callable[[], Tensor]) -> Callable[[], None]:
        def step() -> None:
            for p in params:
                p.grad = None
            fn().backward(grad_out)

        return step

    return {
        "ours": run(lambda: moe(x)),
        "mixtral": run(lambda: mixtral(x, topk_index, topk_weight)),
        "dense": run(lambda: dense(x)),
    }


def bench(steps: dict[str, Callable[[], None]], warmup: int, reps: int) -> dict[str, list[float]]:
    """Seconds per fwd+bwd of each contender and repetition, interleaved in rotating order."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(warmup + reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            steps[name]()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(num: list[float], den: list[float], scale: float = 1.0) -> float:
    """Median over repetitions of num / (scale * den): robust to the machine's speed drifting."""
    return statistics.median(n / (scale * d) for n, d in zip(num, den, strict=True))


def main() -> None:
    """Run all shapes, print a table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, smallest shape only")
    parser.add_argument("--out", default="results/bench_moe.json")
    parser.add_argument("--top-k", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes, warmup, reps = (SHAPES[:1], 2, 5) if args.quick else (SHAPES, 5, 30)
    rows = []
    for hidden, intermediate, tokens in shapes:
        times = bench(contenders(hidden, intermediate, tokens, args.top_k), warmup, reps)
        med = {name: statistics.median(t) for name, t in times.items()}
        rows.append(
            {
                "hidden": hidden,
                "intermediate": intermediate,
                "tokens": tokens,
                "experts": 4,
                "top_k": args.top_k,
                "ours_ms": 1e3 * med["ours"],
                "mixtral_ms": 1e3 * med["mixtral"],
                "k_dense_ms": 1e3 * args.top_k * med["dense"],
                "ours_over_mixtral": paired_ratio(times["ours"], times["mixtral"]),
                "ours_over_k_dense": paired_ratio(times["ours"], times["dense"], args.top_k),
            }
        )
    header = f"{'H':>5} {'I':>5} {'N':>5} | {'ours ms':>8} {'mixtral':>8} {'k*dense':>8} | {'/mixtral':>8} {'/k*dense':>8}"
    print(f"threads={torch.get_num_threads()} reps={reps} warmup={warmup}")
    print("times: medians of fwd+bwd; ratios: medians of per-repetition ratios")
    print(header)
    for r in rows:
        print(
            f"{r['hidden']:>5} {r['intermediate']:>5} {r['tokens']:>5} | {r['ours_ms']:>8.2f} "
            f"{r['mixtral_ms']:>8.2f} {r['k_dense_ms']:>8.2f} | {r['ours_over_mixtral']:>8.3f} "
            f"{r['ours_over_k_dense']:>8.3f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "reps": reps, "warmup": warmup}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
