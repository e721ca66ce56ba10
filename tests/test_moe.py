"""Tests for stgc.moe: upcycling, routing, capacity, losses, masks, records and checkpoints."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from stgc.constants import MODALITIES
from stgc.moe import SparseMoE, moe_layers, moe_losses, routing_context, routing_stats, upcycle
from stgc.moe.experts import expert_mlp

VOCAB = 97
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4
)


def tiny_lm(kind: str = "qwen2", seed: int = 0) -> nn.Module:
    """A tiny float32 causal LM built from a config (no download)."""
    torch.manual_seed(seed)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**COMMON, num_key_value_heads=2)).eval()
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=2)).eval()
    return PhiForCausalLM(PhiConfig(**COMMON, partial_rotary_factor=0.5)).eval()


def tiny_moe(hidden: int = 16, **kwargs) -> SparseMoE:
    """A SparseMoE over a small SwiGLU MLP whose experts are made distinct."""
    torch.manual_seed(0)
    mlp = Qwen2MLP(Qwen2Config(hidden_size=hidden, intermediate_size=24))
    moe = SparseMoE(mlp, hidden, **kwargs)
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return moe


def force_router(moe: SparseMoE, hidden: int) -> None:
    """Router logits = 10 * x[:, :E]: a one-hot input on dim e routes its token to expert e."""
    with torch.no_grad():
        moe.router.weight.copy_(10 * torch.eye(moe.num_experts, hidden))


@pytest.mark.parametrize("kind", ["qwen2", "llama", "phi"])
def test_upcycled_logits_equal_dense(kind: str) -> None:
    model = tiny_lm(kind)
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        dense = model(ids).logits
        dense_mlp = model.model.layers[0].mlp
        upcycle(model, num_experts=4, top_k=2)
        moe = model.model.layers[0].mlp
        upcycled = model(ids).logits
    assert list(moe_layers(model)) == ["model.layers.0.mlp", "model.layers.2.mlp"]
    assert type(moe.experts) is type(dense_mlp)  # the MLP itself, its linears' weights fused (E, ...)
    fused, own = moe.experts.state_dict(), dense_mlp.state_dict()
    assert fused.keys() == own.keys()
    assert all(fused[k].shape == (4, *own[k].shape) for k in own)
    for e in range(4):  # every expert an exact copy
        copy = expert_mlp(moe.experts, e).state_dict()
        assert type(expert_mlp(moe.experts, e)) is type(dense_mlp)
        assert all(torch.equal(copy[k], own[k]) for k in own)
    torch.testing.assert_close(upcycled, dense, atol=1e-5, rtol=1e-5)


def test_an_mlp_with_parameters_outside_linears_is_refused() -> None:
    mlp = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8))
    with pytest.raises(ValueError, match=r"Sequential has parameters outside one: \['1.weight', '1.bias'\]"):
        SparseMoE(mlp, 8)


def test_fused_experts_run_only_inside_their_layer() -> None:
    moe = tiny_moe()
    with pytest.raises(RuntimeError, match="inside its SparseMoE's forward"):
        moe.experts(torch.randn(3, 16))


def test_layers_argument() -> None:
    assert list(moe_layers(upcycle(tiny_lm(), layers="all"))) == [f"model.layers.{i}.mlp" for i in range(4)]
    assert list(moe_layers(upcycle(tiny_lm(), layers=[3, 1]))) == ["model.layers.1.mlp", "model.layers.3.mlp"]
    with pytest.raises(ValueError, match=r"layers \('odd'\)"):
        upcycle(tiny_lm(), layers="odd")
    with pytest.raises(ValueError, match=r"bad: \[4\]"):
        upcycle(tiny_lm(), layers=[0, 4])
    with pytest.raises(ValueError, match="already a SparseMoE"):
        upcycle(upcycle(tiny_lm()))
    with pytest.raises(ValueError, match=r"top_k \(5\)"):
        upcycle(tiny_lm(), num_experts=4, top_k=5)


def test_topk_matches_brute_force() -> None:
    moe = tiny_moe(num_experts=5, top_k=2).eval()
    x = torch.randn(3, 7, 16)
    out = moe(x)
    record = moe.last_routing
    expected = torch.zeros(21, 16)
    for t, xt in enumerate(x.reshape(21, 16)):
        probs = torch.softmax(xt @ moe.router.weight.T, dim=-1)
        top = sorted(range(5), key=lambda e: -probs[e].item())[:2]
        assert record.topk_index[t].tolist() == top
        weights = probs[top] / probs[top].sum()
        torch.testing.assert_close(record.topk_weight[t], weights)
        expected[t] = sum(
            w * expert_mlp(moe.experts, e)(xt[None])[0] for w, e in zip(weights, top, strict=True)
        )
    torch.testing.assert_close(out, expected.view(3, 7, 16), atol=1e-6, rtol=1e-5)
    assert record.router_logits.dtype == torch.float32
    torch.testing.assert_close(record.topk_weight.sum(-1), torch.ones(21))


def test_capacity_drops_exact_count() -> None:
    hidden, experts = 8, 4
    dropless = tiny_moe(hidden, num_experts=experts, top_k=2)
    capped = tiny_moe(hidden, num_experts=experts, top_k=2, capacity_factor=1.0)
    # first choices (x = 2 * onehot): 0,0,0,0,0,1,1,2 ; second choices (x += onehot): 1,1,1,2,3,2,0,3
    first, second = [0, 0, 0, 0, 0, 1, 1, 2], [1, 1, 1, 2, 3, 2, 0, 3]
    x = 2 * torch.eye(hidden)[first] + torch.eye(hidden)[second]  # (8, H)
    for moe in (dropless, capped):
        force_router(moe, hidden)
    dropless(x[None])
    out = capped(x[None])[0]
    # capacity = ceil(1.0 * 8 * 2 / 4) = 4; expert 0 gets tokens 0,1,2,3,4,6 -> keeps 0..3, drops 4 and 6;
    # expert 1 gets 0,1,2,5,6 -> keeps 0,1,2,5, drops 6; experts 2 (3,5,7) and 3 (4,7) fit.
    assert dropless.last_routing.num_dropped == 0
    assert capped.last_routing.num_dropped == 3
    assert [r.tolist() for r in capped.last_routing.expert_rows] == [
        [0, 1, 2, 3],
        [0, 1, 2, 5],
        [3, 5, 7],
        [4, 7],
    ]
    weight = capped.last_routing.topk_weight
    # token 4 keeps only its second choice (expert 3), token 6 keeps neither: no renormalisation after drops
    torch.testing.assert_close(out[4], weight[4, 1] * expert_mlp(capped.experts, 3)(x[4:5])[0])
    torch.testing.assert_close(out[6], torch.zeros(hidden))
    assert routing_stats(capped.last_routing)["dropped_fraction"] == 3 / 16


def test_load_balancing_loss_uniform_and_skewed() -> None:
    hidden, experts = 8, 4
    moe = tiny_moe(hidden, num_experts=experts, top_k=1)
    force_router(moe, hidden)
    moe(torch.eye(hidden)[[0, 1, 2, 3, 3, 2, 1, 0]][None])  # each expert gets 2 tokens, symmetric probs
    torch.testing.assert_close(moe.last_routing.aux_loss, torch.tensor(1.0))
    moe(torch.eye(hidden)[[0, 0, 0, 1, 0, 0, 0, 0]][None])
    assert moe.last_routing.aux_loss.item() > 1.5


def test_padding_excluded_from_routing() -> None:
    moe = tiny_moe(num_experts=4, top_k=2)
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    with routing_context(moe, token_mask=mask, modality=torch.full((2, 6), MODALITIES["image"])):
        out = moe(x)
    masked = moe.last_routing
    assert moe.token_mask is None and moe.modality is None
    out_kept = moe(x[mask][None])[0]  # the same tokens routed alone
    kept = moe.last_routing
    assert masked.token_index.tolist() == mask.reshape(-1).nonzero().squeeze(1).tolist()
    torch.testing.assert_close(out[mask], out_kept)
    torch.testing.assert_close(out[~mask], torch.zeros(2, 16))
    torch.testing.assert_close(masked.aux_loss, kept.aux_loss)
    torch.testing.assert_close(masked.z_loss, kept.z_loss)
    assert masked.modality.shape == (10,)
    stats = {k: v for k, v in routing_stats(masked).items() if not k.startswith(("load_image", "load_text"))}
    assert stats == pytest.approx(routing_stats(kept))
    with routing_context(moe, token_mask=mask), pytest.raises(ValueError, match=r"\(2, 6\).*\(2, 5, 16\)"):
        moe(x[:, :5])


def test_model_padding_does_not_change_losses() -> None:
    model = upcycle(tiny_lm())
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    losses = []
    for pad_id in (0, 5):
        ids[0, 6:] = pad_id
        with torch.no_grad(), routing_context(model, token_mask=mask):
            model(ids, attention_mask=mask.long())
        losses.append(moe_losses(model))
    torch.testing.assert_close(losses[0], losses[1])


def test_gradients_reach_router_and_experts() -> None:
    model = upcycle(tiny_lm()).train()
    ids = torch.randint(0, VOCAB, (4, 16))
    loss = model(ids, labels=ids).loss
    aux, z = moe_losses(model)
    (loss + 0.01 * aux + 0.001 * z).backward()
    for moe in moe_layers(model).values():
        assert moe.router.weight.grad.abs().sum() > 0
        for p in moe.experts.parameters():  # (E, ...): every expert's slice
            assert p.grad is not None and (p.grad.flatten(1).abs().sum(1) > 0).all()


def test_state_dict_round_trip() -> None:
    source = upcycle(tiny_lm(seed=0), num_experts=3, top_k=2, layers=[1, 2])
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))
    target = upcycle(tiny_lm(seed=1), num_experts=3, top_k=2, layers=[1, 2])
    target.load_state_dict(source.state_dict())
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert torch.equal(source(ids).logits, target(ids).logits)


def test_a_checkpoint_with_one_module_per_expert_loads_into_fused_experts() -> None:
    """State dicts saved before the experts were fused (experts.<e>.<name>) still load, expert by expert."""
    source = upcycle(tiny_lm(seed=0), num_experts=3, top_k=2, layers=[1])
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))
    per_expert = {}
    for key, value in source.state_dict().items():
        if ".mlp.experts." in key:
            head, name = key.split(".mlp.experts.")
            per_expert.update({f"{head}.mlp.experts.{e}.{name}": value[e].clone() for e in range(3)})
        else:
            per_expert[key] = value
    target = upcycle(tiny_lm(seed=1), num_experts=3, top_k=2, layers=[1])
    target.load_state_dict(per_expert)
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert torch.equal(source(ids).logits, target(ids).logits)
    del per_expert["model.layers.1.mlp.experts.2.up_proj.weight"]
    with pytest.raises(ValueError, match=r"lacks \['model.layers.1.mlp.experts.2.up_proj.weight'\]"):
        target.load_state_dict(per_expert)


def test_jitter_only_in_training() -> None:
    moe = tiny_moe(num_experts=4, top_k=2, router_jitter=0.5)
    x = torch.randn(2, 5, 16)
    assert torch.equal(moe.eval()(x), moe(x))
    assert moe.last_routing.router_input.data_ptr() == x.data_ptr()
    moe.train()
    moe(x)
    first = moe.last_routing.router_logits
    moe(x)
    assert not torch.equal(first, moe.last_routing.router_logits)
    recomputed = moe.last_routing.router_input.float() @ moe.router.weight.float().T
    torch.testing.assert_close(moe.last_routing.router_logits, recomputed)


def test_record_consistent() -> None:
    moe = tiny_moe(num_experts=4, top_k=2)
    modality = torch.tensor([[0, 1, 1, 1, 0, 0, 0]])
    with routing_context(moe, token_mask=None, modality=modality):
        moe(torch.randn(1, 7, 16))
    record = moe.last_routing
    assert record.router_input.shape == (7, 16) and record.router_logits.shape == (7, 4)
    assert record.topk_index.shape == record.topk_weight.shape == (7, 2)
    assert record.num_dropped == 0 and record.modality.tolist() == modality[0].tolist()
    pairs = sorted((row, e) for e, rows in enumerate(record.expert_rows) for row in rows.tolist())
    assert pairs == sorted((t, e) for t, row in enumerate(record.topk_index.tolist()) for e in row)
    stats = routing_stats(record)
    assert sum(stats[f"load/expert_{e}"] for e in range(4)) == pytest.approx(1.0)
    assert sum(stats[f"load_image/expert_{e}"] for e in range(4)) == pytest.approx(1.0)
    assert 0 < stats["entropy"] <= torch.log(torch.tensor(4.0)).item()


def test_expert_hooks_see_record_rows() -> None:
    moe = tiny_moe(num_experts=4, top_k=2)
    seen = []
    moe.experts.gate_proj.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    x = torch.randn(2, 8, 16)
    moe(x)
    record = moe.last_routing  # the experts' input: every expert's rows, in expert order
    torch.testing.assert_close(seen[-1], x.reshape(16, 16)[torch.cat(record.expert_rows)])
    assert record.groups.sizes == [rows.numel() for rows in record.expert_rows]
    assert record.groups.row_experts.tolist() == [
        e for e, rows in enumerate(record.expert_rows) for _ in rows
    ]


def test_all_tokens_masked_gives_zeros_and_zero_losses() -> None:
    moe = tiny_moe(num_experts=4, top_k=2)
    with routing_context(moe, token_mask=torch.zeros(2, 3, dtype=torch.bool)):
        out = moe(torch.randn(2, 3, 16))
    assert torch.equal(out, torch.zeros(2, 3, 16))
    assert moe.last_routing.aux_loss.item() == 0 and moe.last_routing.z_loss.item() == 0
    with pytest.raises(ValueError, match="bool"), routing_context(moe, token_mask=torch.ones(2, 3)):
        pass


def test_router_runs_in_float32_under_bf16_autocast_and_experts_in_bf16() -> None:
    """The routing decision (and the logits STGC differentiates) is the one an fp32 run makes; the
    experts get bf16 inputs, the tensors autograd keeps for their backward."""
    moe = tiny_moe()
    x = torch.randn(2, 7, 16)
    moe(x)
    reference = moe.last_routing
    expert_inputs = []
    moe.experts.register_forward_hook(lambda module, args, output: expert_inputs.append(args[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moe(x)
    routed = moe.last_routing
    assert routed.router_logits.dtype == torch.float32
    torch.testing.assert_close(routed.router_logits, reference.router_logits, rtol=0, atol=0)
    assert torch.equal(routed.topk_index, reference.topk_index)
    assert expert_inputs[-1].dtype == torch.bfloat16
