"""STGC under FSDP2 (ModelParallelStrategy, 2 CPU processes over gloo) and with activation
checkpointing: the same cosines, conflict masks and trained weights as one process and as DDP."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from stgc.callback import STGC
from stgc.method import find_moe_probes
from stgc.moe.recompute import enable_gradient_checkpointing
from support.fit import fit_command, run, stage3_stgc
from support.lightning_models import CausalLMModule, upcycled_qwen2
from support.sharded_stgc import RANKS, STEPS, THRESHOLD, global_batches

SCRIPT = Path(__file__).parent / "support" / "sharded_stgc.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`runs(mode, *flags)`: what support/sharded_stgc.py saved, one dict per rank; each run once."""
    done: dict[tuple[str, ...], list[dict]] = {}

    def get(*args: str) -> list[dict]:
        if args not in done:
            out = tmp_path_factory.mktemp("-".join(a.strip("-") for a in args))
            result = subprocess.run(
                [sys.executable, str(SCRIPT), str(out), *args], capture_output=True, text=True, timeout=300
            )
            assert result.returncode == 0, result.stderr[-3000:]
            ranks = 1 if args[0] == "single" else RANKS
            done[args] = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(ranks)]
        return done[args]

    return get


def per_micro_batch(ranks: list[dict]) -> list[list[dict]]:
    """[micro-batch][layer] in the single process's order: step s's rank 0 half, then its rank 1 half."""
    micro_batches = STEPS * RANKS // len(ranks)  # per process
    layers = len(ranks[0]["seen"]) // micro_batches
    split = [[r["seen"][m * layers : (m + 1) * layers] for m in range(micro_batches)] for r in ranks]
    return split[0] if len(ranks) == 1 else [split[r][s] for s in range(STEPS) for r in range(len(ranks))]


def assert_same_cosines(ranks: list[dict], reference: list[dict]) -> None:
    """Every (token, expert) assignment of every micro-batch: same cosine (1e-6), same conflict flag,
    and the callbacks' conflict counts summed over the ranks equal the reference's."""
    seen, expected = per_micro_batch(ranks), per_micro_batch(reference)
    assert len(seen) == len(expected) == STEPS * RANKS
    for micro_batch, (layers, expected_layers) in enumerate(zip(seen, expected, strict=True)):
        for layer, (got, want) in enumerate(zip(layers, expected_layers, strict=True)):
            where = f"micro-batch {micro_batch}, layer {layer}"
            assert torch.equal(got["rows"], want["rows"]) and torch.equal(got["expert"], want["expert"]), (
                where
            )
            torch.testing.assert_close(got["cosine"], want["cosine"], rtol=0, atol=1e-6, msg=where)
            flags = [c["has_grad"] & (c["cosine"] < THRESHOLD) for c in (got, want)]
            assert torch.equal(*flags), where
    for key in ("conflict_counts", "assignment_counts"):
        assert torch.equal(sum(r[key] for r in ranks), reference[0][key]), key
    assert reference[0]["conflict_counts"].sum() > 0  # the comparison covers conflicting tokens


@pytest.mark.parametrize("flags", [(), ("--checkpointing",)], ids=["fsdp2", "fsdp2_with_checkpointing"])
def test_fsdp2_cosines_and_conflict_masks_equal_one_process_on_the_same_global_batch(runs, flags) -> None:
    """Each rank's cosines are against its own micro-batch's expert gradients, as under DDP: one
    process that accumulates the two halves of each global batch sees the same ones."""
    assert_same_cosines(runs("fsdp2", *flags), runs("single"))


def test_fsdp2_with_transformers_fused_experts_and_checkpointing(runs) -> None:
    """OLMoE's fused 3-D experts (the "stgc" experts implementation), sharded and recomputed."""
    assert_same_cosines(runs("fsdp2", "--checkpointing", "--hf-experts"), runs("single", "--hf-experts"))


@pytest.mark.slow
def test_ddp_and_fsdp2_on_a_sigmoid_router_equal_one_process(runs) -> None:
    """GLM-4.5V's language model (sigmoid router, correction bias, group-limited top-k, a shared expert):
    the same cosines and flags under DDP and FSDP2 as one process, and the same trained weights."""
    single = runs("single", "--family", "glm4v_moe")
    assert_same_cosines(runs("fsdp2", "--family", "glm4v_moe"), single)
    assert_same_cosines(runs("ddp", "--family", "glm4v_moe"), single)
    fsdp2, ddp = runs("fsdp2", "--family", "glm4v_moe"), runs("ddp", "--family", "glm4v_moe")
    for name, value in ddp[0]["state_dict"].items():
        torch.testing.assert_close(fsdp2[0]["state_dict"][name], value, rtol=0, atol=1e-5, msg=name)


def test_checkpointing_gives_the_cosines_of_a_run_without(runs) -> None:
    assert_same_cosines(runs("single", "--checkpointing"), runs("single"))


def test_fsdp2_trained_weights_equal_ddp_after_five_steps(runs) -> None:
    fsdp2, ddp = runs("fsdp2"), runs("ddp")
    routers = [name for name in ddp[0]["state_dict"] if "router" in name]
    assert routers
    for name, value in ddp[0]["state_dict"].items():
        for rank in fsdp2:
            torch.testing.assert_close(rank["state_dict"][name], value, rtol=0, atol=1e-5, msg=name)
    initial = {f"model.{k}": v.double() for k, v in upcycled_qwen2().state_dict().items()}
    assert all((ddp[0]["state_dict"][n] - initial[n]).abs().max() > 1e-3 for n in routers)


def _terms_after_backward(model: torch.nn.Module, ids: torch.Tensor) -> tuple[list, list]:
    """Per probe: the expert inputs held after forward, and the cosine terms after backward."""
    probes = find_moe_probes(model)
    for probe in probes:
        probe.start(True)
    loss = model(input_ids=ids, labels=ids).loss
    held = [[entry[1] for site in probe.sites for entry in site._pending] for probe in probes]
    loss.backward()
    terms = [{e: [t.clone() for t in v] for e, v in probe._terms["exact"].items()} for probe in probes]
    for probe in probes:
        probe.remove()
    return held, terms


def test_checkpointing_captures_each_expert_input_once_in_the_recomputation() -> None:
    """Under checkpointing the first forward keeps no expert input (its activations are freed) and
    the recomputation brings each one back once: the cosine terms — sums, which a second capture
    would double — equal those of a run without checkpointing."""
    ids = global_batches()[0, 0]
    plain = upcycled_qwen2().double().train()
    recomputed = upcycled_qwen2().double().train()
    enable_gradient_checkpointing(recomputed)
    held, terms = _terms_after_backward(plain, ids)
    held_ckpt, terms_ckpt = _terms_after_backward(recomputed, ids)
    assert [len(h) for h in held] == [len(h) for h in held_ckpt] and sum(map(len, held)) > 0
    assert all(x is not None for h in held for x in h) and all(x is None for h in held_ckpt for x in h)
    for layer, layer_ckpt in zip(terms, terms_ckpt, strict=True):
        assert layer.keys() == layer_ckpt.keys()
        for expert, values in layer.items():
            for value, value_ckpt in zip(values, layer_ckpt[expert], strict=True):
                torch.testing.assert_close(value_ckpt, value, rtol=0, atol=1e-6)


@pytest.mark.slow  # `stgc fit` under FSDP2 twice; the other tests here check FSDP2's exactness
def test_stgc_fit_under_fsdp2_resumes_from_its_sharded_checkpoint(easy_vqa_dir, tmp_path) -> None:
    """`stgc fit` with configs/trainer/fsdp2.yaml and checkpointing on 2 processes, stopped after
    epoch 0 and resumed from its sharded last.ckpt (a folder of per-rank shards), ends with the
    weights and STGC counts of an uninterrupted run."""
    fsdp2 = [
        "-c", "configs/trainer/fsdp2.yaml", "--trainer.accelerator=cpu", "--trainer.devices=2",
        "--model.init_args.gradient_checkpointing=true",
    ]  # fmt: skip

    def fit(log_root: Path, *extra: str) -> dict:
        ranks = log_root / "ranks"
        record = ["--trainer.callbacks+=support.ranks.RecordRanks", f"--trainer.callbacks.out_dir={ranks}"]
        run(fit_command([*stage3_stgc(easy_vqa_dir, log_root, 2, *fsdp2), *record, *extra]))
        return torch.load(ranks / "rank0.pt", weights_only=True)

    uninterrupted = fit(tmp_path / "uninterrupted")
    stopped = tmp_path / "stopped"
    fit(stopped, "--trainer.callbacks+=support.faults.StopAfterEpoch", "--trainer.callbacks.epoch=0")
    last = stopped / "easy_vqa" / "stage3_stgc" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2
    resumed = fit(stopped, f"--ckpt_path={last}")
    for key, value in uninterrupted["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    assert torch.equal(resumed["step_counts"][-1][0], uninterrupted["step_counts"][-1][0])
    assert torch.equal(resumed["step_counts"][-1][1], uninterrupted["step_counts"][-1][1])


def test_deepspeed_keeps_its_refusal_by_name() -> None:
    """DeepSpeed's ZeRO flattens parameters into its own buffers: no expert weight, no router .grad."""
    trainer = SimpleNamespace(strategy=object.__new__(DeepSpeedStrategy), precision="32-true")
    with pytest.raises(MisconfigurationException, match="does not support DeepSpeedStrategy: .* or FSDP2"):
        STGC().setup(trainer, CausalLMModule(upcycled_qwen2()), "fit")
