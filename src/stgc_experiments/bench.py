"""What the benchmarks share (scripts/bench_stgc.py, bench_memory.py, gpu_check.py): StepTimer, the
callback that times each training step and keeps the memory peak, and the configured stage III model,
its synthetic batch and its variants' `Trainer.fit` steps, so that every benchmark measures the same way.
"""

import dataclasses
import functools
import math
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, Qwen2Config, Qwen2ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from stgc import STGC
from stgc.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from stgc.data.dataset import output_size
from stgc.method import Settings, STGCMethod
from stgc.method.cosine import weight_product
from stgc.method.statistics import host_values
from stgc.module import LVLMModule
from stgc.moe import SparseMoE, moe_layers, upcycle
from stgc.moe.experts import expert_linears, expert_mlp, grouped
from stgc.moe.grouped import Groups
from stgc_experiments import ROOT

CONFIGS = ROOT / "configs"
SHAPES = ("default", "large")  # the configured model; the same with a wider LM (LARGER_LM)
LARGER_LM = {"hidden_size": 512, "intermediate_size": 1376, "num_attention_heads": 8}
# no STGC: only the one extra product per expert linear that exact cosines need (ProductFloor)
FLOOR = "product_floor"
TURN = ("plain", FLOOR, "stgc")  # the steps of one turn of `turn_steps`, in order
# what each variant changes in the configured callback (None: no callback)
VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    FLOOR: None,
    "stgc_every_step": {"every_n_steps": 1},
    "stgc_every_4": {"every_n_steps": 4},
    "stgc_output": {"every_n_steps": 1, "gradient": "output"},  # the cheaper approximation
    "stgc_logging": {"every_n_steps": 1, "log_every_n_steps": 1},  # every step a logging step: diagnostics
}
QUIET = {"histogram_every_n_steps": 0}  # the bench has no logger to draw histograms for
STEPS_PER_FIT = 4  # timed steps per fit, after one untimed step (optimizer state, first-call costs)
SCRATCH = tempfile.TemporaryDirectory(prefix="stgc-bench-")  # the fits' TensorBoard events, removed at exit


def synchronize(device: torch.device | str) -> None:
    """Wait until the device has done the work queued on it (CUDA; other devices run synchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device | str) -> float:
    """Seconds that fn takes, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def status_bytes(field: str) -> int:
    """A `/proc/self/status` size field (kB) in bytes."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak_memory() -> None:
    """Start a new memory peak: CUDA's allocator peak; on the CPU the process's peak resident set size
    (Linux: VmHWM, reset to the current resident set)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes() -> int:
    """The memory peak since reset_peak_memory (bytes)."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else status_bytes("VmHWM")


def minor_page_faults() -> int:
    """This process's minor page faults so far: the pages the OS gave it fresh (on a CPU, each large
    tensor glibc maps anew; CUDA's caching allocator reuses its blocks instead)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class StepTimer(L.Callback):
    """Each training step's wall time in `times`, from its first hook to the next step's (the last one's:
    to the end of its epoch), with the device synchronised at both (put it first in the callbacks): all
    that the loop does for a step, the other callbacks' batch-end hooks included (STGC measures a logging
    step's reroutes there, once the optimizer has stepped). Its minor page faults in `faults`, and in
    `peak_bytes` the memory peak from the start of training to its end (peak_memory_bytes)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.faults: list[int] = []
        self.peak_bytes: int | None = None
        self._start: float | None = None
        self._faults = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reset_peak_memory()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._lap(pl_module)
        self._faults = minor_page_faults()
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._lap(pl_module)

    def _lap(self, pl_module: L.LightningModule) -> None:
        """End the step being timed, if one is."""
        synchronize(pl_module.device)
        if self._start is not None:
            self.times.append(time.perf_counter() - self._start)
            self.faults.append(minor_page_faults() - self._faults)
            self._start = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak_bytes = peak_memory_bytes()


def config(path: str) -> dict[str, Any]:
    """A config file under configs/, resolved."""
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / path), resolve=True)


def model_args(shape: str) -> dict[str, Any]:
    """LVLMModule arguments of the configured stage III model, untrained (its tokenizer in the
    repository's data/); "large" widens its LM."""
    model, stage3 = config("easy_vqa/model.yaml"), config("easy_vqa/stage3_moe.yaml")
    args = model["model"]["init_args"] | stage3["model"]["init_args"] | {"init_from": None}
    args["tokenizer"] = str(ROOT / args["tokenizer"])
    if shape == "large":
        args["lm_config"] = args["lm_config"] | LARGER_LM
    return args


def stgc_args() -> dict[str, Any]:
    """The STGC callback's arguments in stage3_moe_stgc.yaml."""
    callbacks = config("easy_vqa/stage3_moe_stgc.yaml")["trainer"]["callbacks"]
    return next(c["init_args"] for c in callbacks if c["class_path"] == "stgc.STGC")


def trainer_args() -> dict[str, Any]:
    """The configured Trainer settings that change a step's work (precision, clipping)."""
    trainer = config("trainer.yaml")["trainer"]
    return {key: trainer[key] for key in ("accelerator", "precision", "gradient_clip_val")}


def batch(module: LVLMModule, batch_size: int, text_tokens: int) -> dict[str, torch.Tensor]:
    """A stage III-shaped batch: the image positions then text, every position trained but the image."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(4, len(module.tokenizer), (batch_size, text_tokens), generator=generator)
    image = torch.full((batch_size, module.num_image_tokens), IMAGE_TOKEN_ID)
    ids = torch.cat([image, text], dim=1)
    height, width = output_size(module.image_transform(False))
    return {
        "images": torch.randn(batch_size, 3, height, width, generator=generator),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.masked_fill(ids == IMAGE_TOKEN_ID, IGNORE_INDEX),
    }


def to_device(data: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device`."""
    return {key: value.to(device) for key, value in data.items()}


def fit_steps(
    module: LVLMModule, data: dict, variant: str, steps: int, watchers: Sequence[L.Callback] = ()
) -> StepTimer:
    """`steps` training steps of one variant (a VARIANTS key) through Trainer.fit (a fresh trainer:
    global step 0 is STGC's first active step), logging to TensorBoard as a run does (a scratch folder,
    so that a logging step pays for writing its metrics); their StepTimer. `watchers` run after the
    timer, before STGC."""
    change = VARIANTS[variant]
    if variant == FLOOR:
        callbacks = [ProductFloor()]
    else:
        callbacks = [] if change is None else [STGC(**stgc_args() | QUIET | change)]
    return _timed_fit(module, data, steps, [*watchers, *callbacks], variant)


def turn_steps(module: LVLMModule, data: dict, variant: str, turns: int) -> dict[str, list[float]]:
    """Per kind of step (TURN: a plain step, the floor's product alone, a step of the STGC `variant`, a
    VARIANTS key measuring every step), its time in each of `turns` turns of one fit, after one untimed
    turn. On a CPU a step's time drifts more over the seconds between two fits than between neighbouring
    steps (their lag-1 autocorrelation is about 0.6), so each STGC step is paired with the floor and the
    plain step just before it. The plain and floor steps carry STGC's idle hooks (`round_robin`'s every
    4th step shows what they cost)."""
    period = len(TURN)
    stgc = STGC(**stgc_args() | QUIET | VARIANTS[variant] | {"every_n_steps": period, "start_step": 2})
    timer = _timed_fit(module, data, period * (turns + 1), [ProductFloor(period, phase=1), stgc], variant)
    times = timer.times[period:]
    return {kind: times[index::period] for index, kind in enumerate(TURN)}


def _timed_fit(
    module: LVLMModule, data: dict, steps: int, callbacks: Sequence[L.Callback], name: str
) -> StepTimer:
    """`steps` Trainer.fit steps on `data`, StepTimer first among the callbacks, TensorBoard logging under
    `name` in the scratch folder."""
    timer = StepTimer()
    trainer = L.Trainer(
        **trainer_args(),
        devices=1,
        max_steps=steps,
        callbacks=[timer, *callbacks],
        logger=TensorBoardLogger(SCRATCH.name, name=name),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, DataLoader([data] * steps, batch_size=None))
    return timer


class ProductFloor(L.Callback):
    """The floor of exact cosines, measured: in each step's backward, when an expert weight's gradient G
    arrives, the one product that STGC's weight hook cannot avoid (stgc.method.cosine.weight_product, as
    row_terms runs it: every expert's rows at once) and nothing else; on the steps whose global step is
    `phase` modulo `period` (every step by default). Not for checkpointed models: their recomputed
    forward would add its rows again."""

    def __init__(self, period: int = 1, phase: int = 0) -> None:
        self.period, self.phase = period, phase
        self.active = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.active = trainer.global_step % self.period == self.phase

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.handles = []
        for layer in moe_layers(pl_module).values():
            for linear in expert_linears(layer.experts):
                pending: list[list] = []  # [X (S, d_in), groups, Δ (S, d_out)] of this step's forward
                self.handles += [
                    linear.register_forward_hook(functools.partial(self._keep, pending)),
                    linear.weight.register_hook(functools.partial(self._product, pending)),
                ]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for handle in self.handles:
            handle.remove()

    def _keep(self, pending: list, linear: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.active and torch.is_grad_enabled():
            entry = [args[0].detach(), linear.groups, None]
            pending.append(entry)
            output.register_hook(lambda grad: entry.__setitem__(2, grad))

    @staticmethod
    @torch.no_grad()
    def _product(pending: list, grad_weight: torch.Tensor) -> None:  # grad_weight (E, d_out, d_in)
        for inputs, groups, output_grads in pending:
            weight_product(inputs, output_grads, grad_weight, groups)
        pending.clear()


def round_robin(
    variants: Sequence[str],
    copies: Sequence[LVLMModule],
    data: dict,
    reps: int,
    faults: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Per variant (a VARIANTS key), one step time per repetition: the mean of STEPS_PER_FIT steps of one
    fit (and, into `faults` when given, their mean minor page faults), after two rounds of warm-up. The
    variants take turns, so that no variant pays for another's hooks; `copies` are identical copies of
    the model, and each repetition turns both the variants' order and which copy each runs on, so that
    neither a copy's place in memory nor a place in the order stays with one variant (on a CPU either
    moved a variant's steps by several percent for a whole run)."""
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for rep in range(reps + 2):
        turn = rep % len(variants)
        for index, variant in enumerate([*variants[turn:], *variants[:turn]]):
            timer = fit_steps(copies[(index + rep) % len(copies)], data, variant, 1 + STEPS_PER_FIT)
            if rep >= 2:
                times[variant].append(statistics.fmean(timer.times[1:]))
                if faults is not None:
                    faults.setdefault(variant, []).append(statistics.fmean(timer.faults[1:]))
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median of the paired ratios."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def paired_excess(times: list[float], floor: list[float], plain: list[float]) -> dict[str, float]:
    """(times − floor) / plain per repetition: its median, with the distribution-free interval of the median
    from the order statistics: at least 90% coverage from 5 repetitions on (with fewer, their whole range)."""
    excess = sorted((t - f) / p for t, f, p in zip(times, floor, plain, strict=True))
    n = len(excess)
    below = 0  # the most repetitions that may lie outside on each side: P(Binomial(n, 1/2) ≤ below) ≤ 5%
    while math.comb(n, below + 1) and sum(math.comb(n, i) for i in range(below + 2)) / 2**n <= 0.05:
        below += 1
    return {"median": statistics.median(excess), "low": excess[below], "high": excess[n - 1 - below]}


@dataclasses.dataclass
class ExpertsCall:
    """One MoE layer's experts as a training step ran them: their input rows (sorted by expert), where each
    expert's rows are, and the gradient at their output."""

    layer: SparseMoE
    inputs: torch.Tensor  # (S, H)
    groups: Groups
    output_grad: torch.Tensor  # (S, H)

    def run(self) -> None:
        """The experts' forward and backward on these rows, as the layer runs them (all experts at once)."""
        with grouped(self.layer.experts, self.groups):
            self.layer.experts(self.inputs.requires_grad_()).backward(self.output_grad)

    def per_expert(self) -> list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
        """(expert as a dense MLP, its input rows, the gradient at its output) of each expert with rows: what
        the naive ways run expert by expert."""
        parts = zip(
            self.inputs.split(self.groups.sizes), self.output_grad.split(self.groups.sizes), strict=True
        )
        return [
            (expert_mlp(self.layer.experts, e), x.detach(), grad)
            for e, (x, grad) in enumerate(parts)
            if x.shape[0]
        ]


def captured_experts(
    module: LVLMModule, data: dict, autocast: torch.dtype | None = None
) -> list[ExpertsCall]:
    """The experts' call of every MoE layer in one step (under `autocast` when given)."""
    calls: list[tuple[SparseMoE, torch.Tensor, torch.Tensor]] = []

    def keep(layer):
        def hook(_, args, output):
            calls.append((layer, args[0].detach(), output))

        return hook

    layers = moe_layers(module.model).values()
    handles = [layer.experts.register_forward_hook(keep(layer)) for layer in layers]
    with torch.autocast(module.device.type, dtype=autocast, enabled=autocast is not None):
        loss = module(data).loss
    for handle in handles:
        handle.remove()
    outputs = [output for _, _, output in calls]
    grads = torch.autograd.grad(loss, outputs, allow_unused=True, materialize_grads=True)
    module.zero_grad(set_to_none=True)
    return [
        ExpertsCall(layer, x, layer.last_routing.groups, grad)
        for (layer, x, _), grad in zip(calls, grads, strict=True)
    ]


def experts_time(calls: list[ExpertsCall], device: str, autocast: torch.dtype | None = None) -> float:
    """The experts' forward and backward alone, on the rows they processed in a real step."""

    def run():
        with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
            for call in calls:
                call.run()

    return timed(run, device)


PARTS = ("stgc.capture", "stgc.weight_hook", "stgc.output_hook", "stgc.after_backward", "stgc.reroutes")


def _launched_ops(event: Any) -> int:
    """The aten operators run directly under a profiler event that compute something (those inside another
    aten op, and views, which run no kernel, not counted)."""
    return sum(
        (not _is_view(child.name)) if child.name.startswith("aten::") else _launched_ops(child)
        for child in event.cpu_children
    )


@functools.cache
def _is_view(name: str) -> bool:
    """Whether an aten operator only makes a view of its input (expand, select, split, ...)."""
    try:
        packet = getattr(torch.ops.aten, name.removeprefix("aten::"))
    except AttributeError:
        return False
    return any(getattr(packet, overload).is_view for overload in packet.overloads())


def _part_counts(profiler: torch.profiler.profile, steps: int) -> dict[str, dict[str, float]]:
    """Per STGC part (PARTS), its time and operators per step."""
    parts = {part: {"ms": 0.0, "ops": 0} for part in PARTS}
    for event in profiler.events():
        if event.name in parts:
            parts[event.name]["ms"] += event.cpu_time_total / 1e3 / steps
            parts[event.name]["ops"] += _launched_ops(event) / steps
    return parts


def tiny_qwen3_moe(num_experts: int, num_layers: int = 2) -> PreTrainedModel:
    """A tiny Qwen3-MoE built here (transformers' fused experts): `num_experts` top-2 in each of its layers."""
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=num_experts, num_experts_per_tok=2,
    )  # fmt: skip
    return Qwen3MoeForCausalLM(config)


def tiny_sparse_moe(num_experts: int, num_layers: int = 2) -> PreTrainedModel:
    """A tiny Qwen2 upcycled here into this project's SparseMoE: `num_experts` top-2 in each of its layers
    (routers perturbed, so that routing matters)."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    upcycle(model, num_experts=num_experts, top_k=2, layers="all")
    for layer in moe_layers(model).values():
        torch.nn.init.normal_(layer.router.weight, std=0.5)
    return model


def method_profile(
    model: torch.nn.Module, steps: int = 2, autocast: torch.dtype | None = None, logging: bool = False
) -> dict[str, Any]:
    """`_part_counts` of STGC's steps (the configured callback's settings, stgc.method on its own) on a
    transformers causal LM, batch 8 x 64 on its device, after two untimed steps (under `autocast` when
    given; each a logging step, its metrics copied to the host, when `logging`); "finite": whether every
    step's terms were."""
    device = next(model.parameters()).device
    settings = {f.name for f in dataclasses.fields(Settings)}
    method = STGCMethod(**{key: value for key, value in stgc_args().items() if key in settings})
    method.attach(model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.get_text_config().vocab_size, (8, 64), generator=generator).to(device)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    finite = True
    for step in range(2 + steps):
        if step == 2:
            profiler.__enter__()
        method.begin({"input_ids": ids})
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        result = method.after_backward(logging=logging)
        host_values(result.metrics)  # what a logger does with them
        finite = result.finite and finite
        model.zero_grad(set_to_none=True)
    profiler.__exit__(None, None, None)
    method.detach()
    return {"parts": _part_counts(profiler, steps), "finite": finite}


def layer_operators(parts: dict[str, dict[str, float]], layers: int) -> dict[str, float]:
    """STGC's operators per MoE layer per step: in after_backward, and in its hooks in forward and backward."""
    hooks = sum(parts[part]["ops"] for part in ("stgc.capture", "stgc.weight_hook", "stgc.output_hook"))
    return {"after_backward": parts["stgc.after_backward"]["ops"] / layers, "hooks": hooks / layers}


def method_layer_operators(
    build: Callable[[], torch.nn.Module], device: str = "cpu", layers: int = 2
) -> dict[str, float]:
    """`layer_operators` of `method_profile` on the model `build` makes (on `device`, with `layers` MoE
    layers), and a logging step's after_backward beside them, on a second one."""
    measured = layer_operators(method_profile(build().to(device))["parts"], layers)
    logging = layer_operators(method_profile(build().to(device), logging=True)["parts"], layers)
    return measured | {"logging_after_backward": logging["after_backward"]}


def step_profile(module: LVLMModule, data: dict, variant: str, steps: int = 3) -> dict[str, Any]:
    """torch.profiler over `steps` steps of a variant, after two untimed ones: per step the wall time and
    operator count of each STGC part (the record_function ranges of stgc.method), of all aten operators,
    and the step time."""

    class Profiled(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 2:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.profiler.__enter__()

        def on_train_end(self, trainer, pl_module) -> None:
            self.profiler.__exit__(None, None, None)

    profiled = Profiled()
    timer = fit_steps(module, data, variant, 2 + steps, [profiled])
    events = profiled.profiler.events()
    return {
        "step_ms": 1e3 * statistics.fmean(timer.times[2:]),
        "aten_ops": sum(1 for event in events if event.name.startswith("aten::")) / steps,
        "parts": _part_counts(profiled.profiler, steps),
    }
