"""Benchmark SparseMoE fwd+bwd on CPU against transformers' MixtralExperts and k x dense MLP.

All contenders see the same input and output gradient; MixtralExperts, in each of its experts
implementations ("eager", "grouped_mm", "batched_mm"), is fed SparseMoE's routing (same top-k indices
and weights) and its fused weights are copied from SparseMoE's experts. SparseMoE's time includes its
router, losses and dispatch; MixtralExperts' excludes routing.
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


MIXTRAL_IMPLEMENTATIONS = ("eager", "grouped_mm")  # transformers' ("batched_mm" holds a weight per token)


def mixtral_from(moe: SparseMoE, intermediate: int, implementation: str) -> MixtralExperts:
    """MixtralExperts (`implementation`) whose fused weights are copies of `moe`'s Qwen2MLP experts."""
    hidden = moe.router.in_features
    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_local_experts=moe.num_experts,
        hidden_act="silu",
    )
    config._experts_implementation = implementation
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
    mixtrals = {name: mixtral_from(moe, intermediate, name) for name in MIXTRAL_IMPLEMENTATIONS}
    x = torch.randn(tokens, hidden, requires_grad=True)  # (N, H)
    grad_out = torch.randn(tokens, hidden)  # (N, H)
    with torch.no_grad():
        moe(x)
    topk_index = moe.last_routing.topk_index  # (N, k)
    topk_weight = moe.last_routing.topk_weight.detach().clone().requires_grad_()  # (N, k)
    params = [x, topk_weight, *moe.parameters(), *dense.parameters()]
    params += [p for mixtral in mixtrals.values() for p in mixtral.parameters()]

    def run(fn: Callable[[], Tensor]) -> Callable[[], None]:
        def step() -> None:
            for p in params:
                p.grad = None
            fn().backward(grad_out)

        return step

    steps = {"ours": run(lambda: moe(x)), "dense": run(lambda: dense(x))}
    for name, mixtral in mixtrals.items():
        steps[f"mixtral_{name}"] = run(lambda m=mixtral: m(x, topk_index, topk_weight))
    return steps


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
        fastest = [
            min(t) for t in zip(*(times[f"mixtral_{m}"] for m in MIXTRAL_IMPLEMENTATIONS), strict=True)
        ]
        rows.append(
            {
                "hidden": hidden,
                "intermediate": intermediate,
                "tokens": tokens,
                "experts": 4,
                "top_k": args.top_k,
                "ours_ms": 1e3 * med["ours"],
                **{f"mixtral_{m}_ms": 1e3 * med[f"mixtral_{m}"] for m in MIXTRAL_IMPLEMENTATIONS},
                "k_dense_ms": 1e3 * args.top_k * med["dense"],
                **{
                    f"ours_over_mixtral_{m}": paired_ratio(times["ours"], times[f"mixtral_{m}"])
                    for m in MIXTRAL_IMPLEMENTATIONS
                },
                "ours_over_fastest_mixtral": paired_ratio(times["ours"], fastest),
                "ours_over_k_dense": paired_ratio(times["ours"], times["dense"], args.top_k),
            }
        )
    names = [f"mixtral {m}" for m in MIXTRAL_IMPLEMENTATIONS]
    print(f"threads={torch.get_num_threads()} reps={reps} warmup={warmup}")
    print(
        "times (ms): medians of fwd+bwd; ratios: medians of per-repetition ratios (fastest: of each repetition)"
    )
    print(
        f"{'H':>5} {'I':>5} {'N':>5} | {'ours':>7} {' '.join(f'{n:>18}' for n in names)} {'k*dense':>8} | ours / each, fastest, k*dense"
    )
    for r in rows:
        ratios = [r[f"ours_over_mixtral_{m}"] for m in MIXTRAL_IMPLEMENTATIONS]
        print(
            f"{r['hidden']:>5} {r['intermediate']:>5} {r['tokens']:>5} | {r['ours_ms']:>7.2f} "
            + " ".join(f"{r[f'mixtral_{m}_ms']:>18.2f}" for m in MIXTRAL_IMPLEMENTATIONS)
            + f" {r['k_dense_ms']:>8.2f} | "
            + " ".join(f"{x:.3f}" for x in ratios)
            + f", {r['ours_over_fastest_mixtral']:.3f}, {r['ours_over_k_dense']:.3f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "reps": reps, "warmup": warmup}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
