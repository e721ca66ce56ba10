"""What does STGC cost? Training steps with and without the callback, alternated in one run.

For the stage III easy-vqa model of the configs (configs/easy_vqa/model.yaml + stage3_moe.yaml,
untrained; and a larger LM shape) on a fixed batch, each step a `Trainer.fit` step with the
callback of stage3_moe_stgc.yaml, as users run it:
  * step time: plain, STGC with conflicts every step, STGC every 4th step, STGC with
    gradient="output", and STGC with every step a logging step (its diagnostics run), paired by
    repetition; the other variants log at the trainer's period, so their steps carry no diagnostics;
  * the floor that exact cosines cannot beat, measured: a step that adds only the one extra product
    per expert linear, in the weight's gradient hook as STGC does (stgc_experiments.bench.ProductFloor),
    and STGC's excess over it per repetition, with an interval; beside it the floor's estimate 1 + s/3,
    s the experts' share of the plain step (their fwd+bwd timed alone on the step's own rows);
  * the same ratios in turns: within one fit per STGC variant, a plain step, a floor step and an STGC
    step take turns, each STGC step paired with the two just before it (stgc_experiments.bench.turn_steps;
    neighbouring steps agree far better than fits seconds apart on a CPU);
  * STGC's extra time against the two naive ways to get the same cosines: per-token gradients
    materialised with torch.func, and a second backward pass (with G = ΔᵀX recomputed);
  * peak memory with / without: the peak of a few training steps in a fresh process (StepTimer's:
    CUDA: allocator peak; CPU: peak resident set size);
  * the cosine computation's time over growing token counts (should grow linearly).

    python scripts/bench_stgc.py [--quick] [--out results/bench_stgc.json]
    python scripts/bench_stgc.py --shapes default --reps 8 --steps-only   # the step-time ratios alone,
        # and each variant's minor page faults per step (CPU: fresh pages of large tensors, see docs/design.md §8)
    python scripts/bench_stgc.py --quick --profile   # where the time goes: STGC's parts, operator counts

The last lines (two per shape) print the step-time ratios, STGC's excess over the floor, and the
peak-memory ratio; then the ratios and the excess measured in turns.
"""

import argparse
import functools
import json
import logging
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.func import functional_call, grad

from stgc.easy_vqa.prepare import prepare
from stgc.method.cosine import linear_gradient_terms, token_gradient_cosine
from stgc.module import LVLMModule
from stgc.moe import moe_layers
from stgc_experiments.bench import (
    FLOOR,
    SHAPES,
    TURN,
    VARIANTS,
    ExpertsCall,
    batch,
    captured_experts,
    experts_time,
    fit_steps,
    layer_operators,
    median_ratio,
    method_layer_operators,
    model_args,
    paired_excess,
    round_robin,
    step_profile,
    timed,
    tiny_qwen3_moe,
    to_device,
    turn_steps,
)


def build(shape: str, num_experts: int | None = None) -> LVLMModule:
    """The stage III model (with `num_experts` per MoE layer: the configured number when None); routers
    perturbed, since trained routers are not uniform: routing matters."""
    torch.manual_seed(0)
    args = model_args(shape)
    if num_experts is not None:
        args["moe"] = args["moe"] | {"num_experts": num_experts}
    module = LVLMModule(**args)
    for layer in moe_layers(module.model).values():
        torch.nn.init.normal_(layer.router.weight, std=0.05)
    return module


def step_times(
    shape: str, batch_shape: tuple[int, int], reps: int, faults: dict[str, list[float]] | None = None
) -> dict[str, list[float]]:
    """Per-repetition step times of the variants (and their page faults into `faults`), run round-robin
    on identical copies of the model (turned between repetitions: `round_robin`)."""
    copies = [build(shape) for _ in VARIANTS]
    return round_robin(list(VARIANTS), copies, batch(copies[0], *batch_shape), reps, faults)


TURN_VARIANTS = ("stgc_every_step", "stgc_output", "stgc_logging")  # those measured in turns too


def turn_ratios(shape: str, batch_shape: tuple[int, int], turns: int) -> dict[str, dict]:
    """For each of TURN_VARIANTS, from one fit in which its steps take turns with a plain step and the
    floor's (`turn_steps`): its ratio and the floor's to the plain step, and its excess over the floor,
    per turn (medians, the excess with its interval)."""
    module = build(shape)
    data = batch(module, *batch_shape)
    results = {}
    for variant in TURN_VARIANTS:
        times = turn_steps(module, data, variant, turns)
        plain, floor, stgc = (times[kind] for kind in TURN)
        results[variant] = {
            "ratio": median_ratio(stgc, plain),
            "floor": median_ratio(floor, plain),
            "excess_over_floor": paired_excess(stgc, floor, plain),
        }
    return results


def print_turn_ratios(shape: str, turns: dict[str, dict], count: int) -> None:
    line = "; ".join(
        f"{variant} {r['ratio']:.3f} (floor {r['floor']:.3f}, over it {excess(r['excess_over_floor'])})"
        for variant, r in turns.items()
    )
    print(f"{shape}, in turns with a plain and a floor step ({count} turns): {line}")


def linears_io(expert: torch.nn.Module, x: torch.Tensor, output_grad: torch.Tensor):
    """X and Δ of each of a SwiGLU expert's linears (gate, up, down), recomputed for the naive ways."""
    x = x.detach().requires_grad_()
    gate, up = expert.gate_proj(x), expert.up_proj(x)
    hidden = expert.act_fn(gate) * up
    out = expert.down_proj(hidden)
    deltas = torch.autograd.grad(out, [gate, up, out], output_grad)
    return [x.detach(), x.detach(), hidden.detach()], list(deltas)


def materialised_time(experts: list, device: str, chunk_floats: int = 2**28) -> float:
    """Naive 1: per-token gradients with torch.func, cosine to their sum (the expert's ordinary
    gradient). Chunked so one chunk holds at most chunk_floats gradient entries (1 GiB in fp32)."""

    def run():
        for expert, x, output_grad in experts:
            params = {k: v.detach() for k, v in expert.named_parameters()}
            chunk = max(1, min(256, chunk_floats // sum(p.numel() for p in params.values())))

            def loss(p, xs, gs, expert=expert):  # sum over the rows of xs of <expert(x_i), g_i>
                return (functional_call(expert, p, (xs,)) * gs).sum()

            def token_grad(p, xi, gi):
                return grad(loss)(p, xi[None], gi[None])

            total = torch.cat([g.reshape(-1) for g in grad(loss)(params, x, output_grad).values()])
            per_token = torch.func.vmap(token_grad, in_dims=(None, 0, 0))
            for xs, gs in zip(x.split(chunk), output_grad.split(chunk), strict=True):
                flat = torch.cat([g.reshape(len(xs), -1) for g in per_token(params, xs, gs).values()], 1)
                torch.nn.functional.cosine_similarity(flat, total[None], dim=1)

    return timed(run, device)


def second_backward_time(module: LVLMModule, data: dict, calls: list[ExpertsCall], device: str) -> float:
    """Naive 2: the extra cost of a second backward pass for the expert output gradients, then the
    cosines from X and Δ with G recomputed (what a callback without hooks in backward must do); `calls`:
    the same step's experts calls (their rows and groups)."""
    outputs = []
    handles = [
        call.layer.experts.register_forward_hook(lambda _, args, output: outputs.append(output))
        for call in calls
    ]
    loss = module(data).loss
    loss.backward(retain_graph=True)
    for handle in handles:
        handle.remove()
    experts = [call.per_expert() for call in calls]  # dense copies, made before the clock starts

    def run():
        output_grads = torch.autograd.grad(loss, outputs, allow_unused=True, materialize_grads=True)
        for call, dense, output_grad in zip(calls, experts, output_grads, strict=True):
            grads = [g for g in output_grad.split(call.groups.sizes) if g.shape[0]]
            for (expert, x, _), expert_grad in zip(dense, grads, strict=True):
                token_gradient_cosine(*linears_io(expert, x, expert_grad))

    elapsed = timed(run, device)
    module.zero_grad(set_to_none=True)
    return elapsed


def linearity(hidden: int, intermediate: int, sizes: list[int], device: str) -> list[dict]:
    """Time of one SwiGLU expert's cosine terms (G given, as STGC has it) against the token count."""
    rows = []
    for n in sizes:
        shapes = [(hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]
        xs = [torch.randn(n, d_in, device=device) for d_in, _ in shapes]
        deltas = [torch.randn(n, d_out, device=device) for _, d_out in shapes]
        grads = [d.T @ x for x, d in zip(xs, deltas, strict=True)]

        def run(xs=xs, deltas=deltas, grads=grads):
            for x, d, g in zip(xs, deltas, grads, strict=True):
                linear_gradient_terms(x, d, grad_weight=g)

        run()
        elapsed = statistics.median(timed(run, device) for _ in range(5))
        rows.append({"tokens": n, "ms": 1e3 * elapsed, "us_per_token": 1e6 * elapsed / n})
    return rows


def peak_memory(shape: str, variant: str, batch_size: int, text_tokens: int) -> float:
    """The memory peak (MiB) of a few training steps of one variant, measured in a fresh process."""
    command = [sys.executable, __file__, "--memory-probe", shape, variant, str(batch_size), str(text_tokens)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def memory_probe(shape: str, variant: str, batch_size: int, text_tokens: int) -> None:
    """Print the peak memory (MiB) of three training steps of one variant, from a fresh process."""
    module = build(shape)
    print(fit_steps(module, batch(module, batch_size, text_tokens), variant, 3).peak_bytes / 2**20)


def bench_shape(shape: str, args: argparse.Namespace, device: str) -> dict:
    times = step_times(shape, (args.batch_size, args.text_tokens), args.reps)
    module = build(shape).to(device)
    data = to_device(batch(module, args.batch_size, args.text_tokens), device)
    plain = statistics.median(times["plain"])
    experts = captured_experts(module, data)
    experts_alone = statistics.median(experts_time(experts, device) for _ in range(args.reps))
    share = experts_alone / plain
    stgc_extra = statistics.median(times["stgc_every_step"]) - plain
    # One repetition, on the first MoE layer's experts, times the number of layers: all MoE layers
    # have the same shapes and the same N·k assignments, and this way is slower than all else by far.
    layers = list(moe_layers(module.model).values())
    materialised = len(layers) * materialised_time(experts[0].per_expert(), device)
    second = statistics.median(
        second_backward_time(module, data, experts, device) for _ in range(max(1, args.reps // 4))
    )
    memory = {
        variant: statistics.median(
            peak_memory(shape, variant, args.batch_size, args.text_tokens) for _ in range(args.memory_reps)
        )
        for variant in ("plain", "stgc_every_step")
    }
    lm = module.hparams.lm_config
    return {
        "shape": {
            "lm": lm,
            "batch": [args.batch_size, module.num_image_tokens + args.text_tokens],
            "image_tokens": module.num_image_tokens,
        },
        "plain_step_ms": 1e3 * plain,
        "stgc_step_ms": 1e3 * statistics.median(times["stgc_every_step"]),
        "stgc_every_4_step_ms": 1e3 * statistics.median(times["stgc_every_4"]),
        "ratio_every_step": median_ratio(times["stgc_every_step"], times["plain"]),
        "ratio_every_4": median_ratio(times["stgc_every_4"], times["plain"]),
        "stgc_output_step_ms": 1e3 * statistics.median(times["stgc_output"]),
        "ratio_output": median_ratio(times["stgc_output"], times["plain"]),
        "stgc_logging_step_ms": 1e3 * statistics.median(times["stgc_logging"]),
        "ratio_logging": median_ratio(times["stgc_logging"], times["plain"]),
        "experts_share_s": share,
        "floor": median_ratio(times[FLOOR], times["plain"]),
        "floor_estimate": 1 + share / 3,
        "excess_over_floor": paired_excess(times["stgc_every_step"], times[FLOOR], times["plain"]),
        "stgc_extra_ms": 1e3 * stgc_extra,
        "materialised_extra_ms": 1e3 * materialised,
        "second_backward_extra_ms": 1e3 * second,
        "extra_vs_materialised": stgc_extra / materialised,
        "extra_vs_second_backward": stgc_extra / second,
        "peak_mib": memory,
        "memory_ratio": memory["stgc_every_step"] / memory["plain"],
        "linearity": linearity(lm["hidden_size"], lm["intermediate_size"], args.sizes, device),
        "turns": turn_ratios(shape, (args.batch_size, args.text_tokens), args.turns),
    }


def print_table(results: dict, header: bool = True) -> None:
    if header:
        print(
            f"{'shape':8} {'plain ms':>9} {'stgc ms':>8} {'ratio':>6} {'floor':>6} {'1+s/3':>6} {'every4':>7} "
            f"{'output':>7} {'logged':>7} {'mem':>5} {'vs mat':>7} {'vs 2nd':>7}"
        )
    for shape, r in results.items():
        print(
            f"{shape:8} {r['plain_step_ms']:9.1f} {r['stgc_step_ms']:8.1f} {r['ratio_every_step']:6.3f} "
            f"{r['floor']:6.3f} {r['floor_estimate']:6.3f} {r['ratio_every_4']:7.3f} {r['ratio_output']:7.3f} "
            f"{r['ratio_logging']:7.3f} {r['memory_ratio']:5.2f} "
            f"{r['extra_vs_materialised']:7.3f} {r['extra_vs_second_backward']:7.3f}"
        )
    for shape, r in results.items():
        line = ", ".join(
            f"{row['tokens']}: {row['ms']:.2f} ms ({row['us_per_token']:.2f} us/token)"
            for row in r["linearity"]
        )
        print(f"conflict terms vs tokens ({shape}): {line}")


def print_profile(shape: str, batch_shape: tuple[int, int], expert_counts: list[int]) -> None:
    """Where a step's time goes (torch.profiler, the record_function ranges of stgc.method): per part its
    time and the operators it launches per step, for a plain step, an STGC step and an STGC logging step;
    then the operators per MoE layer per step for each number of experts."""
    module = build(shape)
    data = batch(module, *batch_shape)
    layers = len(moe_layers(module.model))
    plain = step_profile(module, data, "plain")
    print(f"profile ({shape}, batch {batch_shape[0]} x {batch_shape[1]}, under torch.profiler): plain step "
          f"{plain['step_ms']:.1f} ms, {plain['aten_ops']:.0f} aten ops")  # fmt: skip
    for variant in ("stgc_every_step", "stgc_logging"):
        profile = step_profile(module, data, variant)
        parts = ", ".join(
            f"{part.removeprefix('stgc.')} {p['ms']:.2f} ms / {p['ops']:.0f} ops"
            for part, p in profile["parts"].items() if p["ops"]
        )  # fmt: skip
        extra = profile["aten_ops"] - plain["aten_ops"]
        print(f"  {variant}: {profile['step_ms']:.1f} ms, +{extra:.0f} aten ops; {parts}")
    for experts in expert_counts:
        ours = layer_operators(
            step_profile(build(shape, experts), data, "stgc_every_step", steps=2)["parts"], layers
        )
        theirs = method_layer_operators(functools.partial(tiny_qwen3_moe, experts))  # 2 MoE layers too
        print(f"  {experts} experts, per MoE layer per step: SparseMoE {operators(ours)}; "
              f"transformers' fused experts (Qwen3-MoE) {operators(theirs)}, "
              f"a logging step's after_backward {theirs['logging_after_backward']:.0f} ops")  # fmt: skip


def operators(counts: dict[str, float]) -> str:
    return f"after_backward {counts['after_backward']:.0f} ops, hooks {counts['hooks']:.0f} ops"


def print_step_ratios(shape: str, times: dict[str, list[float]], faults: dict[str, list[float]]) -> None:
    """Each variant's step time over the plain step's (medians of the paired ratios), and the minor page
    faults of each variant's step (medians)."""
    plain = statistics.median(times["plain"])
    line = ", ".join(f"{v} {median_ratio(times[v], times['plain']):.3f}" for v in times if v != "plain")
    print(f"{shape}: plain {1e3 * plain:.1f} ms; {line}")
    over = paired_excess(times["stgc_every_step"], times[FLOOR], times["plain"])
    print(f"  every step over the floor: {excess(over)}")
    print(
        "  minor page faults per step: "
        + ", ".join(f"{v} {statistics.median(faults[v]):.0f}" for v in faults)
    )


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banner per fit
    warnings.filterwarnings("ignore", category=PossibleUserWarning)  # "few dataloader workers"
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-probe":
        shape, variant, batch_size, text_tokens = sys.argv[2:]
        memory_probe(shape, variant, int(batch_size), int(text_tokens))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="default shape only, small batch, few repetitions"
    )
    parser.add_argument("--out", default="results/bench_stgc.json")
    parser.add_argument(
        "--shapes", nargs="+", choices=SHAPES, default=list(SHAPES), help="ignored with --quick"
    )
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20, quick 6)")
    parser.add_argument(
        "--turns", type=int, default=None, help="turns per STGC variant (default 30, quick 40)"
    )
    parser.add_argument(
        "--steps-only", action="store_true", help="only the variants' step-time ratios (a few minutes)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="where the step's time goes: STGC's parts and operator counts"
    )
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16, 64], help="with --profile")
    args = parser.parse_args()
    args.batch_size, args.text_tokens = (8, 64) if args.quick else (32, 150)
    args.memory_reps = 1 if args.quick else 2
    args.reps = args.reps or (6 if args.quick else 20)
    args.turns = args.turns or (40 if args.quick else 30)
    args.sizes = [256, 512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096, 8192]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prepare(Path(model_args("default")["tokenizer"]).parent)  # the model's tokenizer (idempotent)
    shapes = ["default"] if args.quick else args.shapes
    if args.profile:
        for shape in shapes:
            print_profile(shape, (args.batch_size, args.text_tokens), args.experts)
        return
    if args.steps_only:
        for shape in shapes:
            faults: dict[str, list[float]] = {}
            times = step_times(shape, (args.batch_size, args.text_tokens), args.reps, faults)
            print_step_ratios(shape, times, faults)
            turns = turn_ratios(shape, (args.batch_size, args.text_tokens), args.turns)
            print_turn_ratios(shape, turns, args.turns)
        return
    results = {}
    for shape in shapes:
        results[shape] = bench_shape(shape, args, device)
        print_table({shape: results[shape]}, header=shape == shapes[0])
    print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {"device": device, "threads": torch.get_num_threads(), "quick": args.quick, "results": results},
            indent=2,
        )
        + "\n"
    )
    for shape, r in results.items():
        batch_size, length = r["shape"]["batch"]
        print(
            f"{shape} ({batch_size} x {length}): step time ratio {r['ratio_every_step']:.3f}, floor "
            f"{r['floor']:.3f} (1 + s/3 = {r['floor_estimate']:.3f}), over the floor "
            f"{excess(r['excess_over_floor'])}; every 4th {r['ratio_every_4']:.3f}, output gradient "
            f"{r['ratio_output']:.3f}, every step logged {r['ratio_logging']:.3f}, peak memory ratio "
            f"{r['memory_ratio']:.3f}"
        )
        turns = r["turns"]
        every, output, logged = (turns[variant] for variant in TURN_VARIANTS)
        print(
            f"{shape} in turns ({args.turns}): step time ratio {every['ratio']:.3f}, floor {every['floor']:.3f},"
            f" over the floor {excess(every['excess_over_floor'])}; output gradient {output['ratio']:.3f},"
            f" every step logged {logged['ratio']:.3f}"
        )


def excess(interval: dict[str, float]) -> str:
    """`paired_excess` as "+0.031 [+0.012, +0.048]" (median [interval])."""
    return f"{interval['median']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"


if __name__ == "__main__":
    main()
