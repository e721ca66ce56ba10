"""How much GPU memory does the paper's stage III need? A table computed from parameter counts.

For the MoE-LLaVA models in stage III, DDP and FSDP2, with and without activation checkpointing (the
memory table of docs/gpus.md).

Each LM is built on the meta device from its transformers config (no download, no memory) and
upcycled as MoE-LLaVA does (4 experts, top-2, every other layer); parameters are counted exactly.
Stage III trains the experts and routers; bf16-mixed keeps fp32 weights:

  model states: 4 B (fp32 weight) per parameter, and per trained parameter 4 B gradient + 8 B
  AdamW moments; FSDP2 divides them by the GPUs and adds one gathered unit (the largest decoder
  layer's weights and gradients, unsharded, fp32).
  activations (bf16) per token: without checkpointing 34·h per dense layer (Korthikanti et al.,
  2022, attention without the s² term as SDPA/flash attention keep none) and 34·h + 19·h·(k − 1)·i/4h
  per MoE layer (its MLP part runs k times); with checkpointing 2·h per layer (its input) plus one
  layer's full activations, recomputed.

    python scripts/memory_table.py [--gpus 8] [--tokens 8192]

--tokens: tokens per GPU per micro-batch (default 4 sequences of 2048).
"""

import argparse
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from stgc.moe import moe_layers, upcycle
from stgc.moe.upcycle import decoder_layers

# The LMs' published sizes (their config.json files); Qwen-1.8B's remote-code "qwen" architecture is
# counted as transformers' qwen2 of the same sizes (same blocks: QKV bias, SwiGLU, untied head).
LMS = {
    "StableLM-2-1.6B": dict(
        model_type="stablelm", hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=100352, tie_word_embeddings=False,
    ),
    "Qwen-1.8B": dict(
        model_type="qwen2", hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, vocab_size=151936, tie_word_embeddings=False,
    ),
    "Phi-2 (2.7B)": dict(
        model_type="phi", hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=51200, tie_word_embeddings=False,
    ),
}  # fmt: skip
VISION_PARAMS = 303_507_456  # CLIP ViT-L/14-336's visual tower (frozen in stage III)
TOP_K, EXPERTS = 2, 4
GIB = 2**30


def counts(config: dict) -> dict[str, int]:
    """Exact parameter counts of the upcycled LM (meta device) plus the vision tower and projector."""
    config = dict(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
        upcycle(model, num_experts=EXPERTS, top_k=TOP_K, layers="every_other")
    hidden = config["hidden_size"]
    projector = 1024 * hidden + hidden + hidden * hidden + hidden  # mlp2x_gelu from ViT-L's 1024
    trained = sum(p.numel() for layer in moe_layers(model).values() for p in layer.parameters())
    largest_layer = max(sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model))
    total = sum(p.numel() for p in model.parameters()) + VISION_PARAMS + projector
    return {"total": total, "trained": trained, "largest_layer": largest_layer}


def activation_bytes(config: dict, tokens: int, checkpointing: bool) -> float:
    """bf16 activations kept for backward (see the module docstring)."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    dense, moe = 34 * h, 34 * h + 19 * h * (TOP_K - 1) * i / (4 * h)
    per_token = (layers - layers // 2) * dense + (layers // 2) * moe
    if checkpointing:
        per_token = 2 * h * layers + moe
    return tokens * per_token


def per_gpu(sizes: dict[str, int], config: dict, gpus: int, tokens: int, sharded: bool, ckpt: bool) -> float:
    """GiB per GPU: model states (+ one gathered layer under FSDP2) and activations."""
    states = 4 * sizes["total"] + 12 * sizes["trained"]
    if sharded:
        states = states / gpus + 8 * sizes["largest_layer"]  # fp32 weights and gradients of one unit
    return (states + activation_bytes(config, tokens, ckpt)) / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4 * 2048, help="tokens per GPU per micro-batch")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"stage III, {args.gpus} GPUs, {args.tokens} tokens per GPU per micro-batch, bf16-mixed, AdamW")
    print(
        "| LM (MoE 4×top-2, every other layer) | parameters | trained | DDP | DDP + ckpt | FSDP2 | FSDP2 + ckpt |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, config in LMS.items():
        sizes = counts(config)
        cells = [
            per_gpu(sizes, config, args.gpus, args.tokens, sharded, ckpt)
            for sharded in (False, True)
            for ckpt in (False, True)
        ]
        print(
            f"| {name} | {sizes['total'] / 1e9:.2f} B | {sizes['trained'] / 1e9:.2f} B | "
            + " | ".join(f"{c:.0f} GiB" for c in cells)
            + " |"
        )


if __name__ == "__main__":
    main()
