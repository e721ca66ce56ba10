"""How much GPU memory does the paper's stage III need? A table computed from parameter counts.

For the MoE-LLaVA models in stage III and for a released MoE VLM fine-tuned with its experts and
routers (Qwen3-VL-30B-A3B, configs/vlm/qwen3_vl_moe_30b_a3b.yaml), DDP and FSDP2, with and without
activation checkpointing (the memory tables of docs/gpus.md).

Each model is built on the meta device from its transformers config (no download, no memory); the
MoE-LLaVA LMs are upcycled as MoE-LLaVA does (4 experts, top-2, every other layer); parameters are
counted exactly. The experts and routers train; bf16-mixed keeps fp32 weights:

  model states: 4 B (fp32 weight) per parameter, and per trained parameter 4 B gradient + 8 B
  AdamW moments; FSDP2 divides them by the GPUs and adds one gathered unit (the largest decoder
  layer's weights and gradients, unsharded, fp32).
  activations (bf16) per token: without checkpointing 34·h per dense layer of a 4h-wide MLP
  (Korthikanti et al., 2022, attention without the s² term as SDPA/flash attention keep none): 15·h
  for attention and the norms, 19·i/4 for an MLP of width i, which an MoE layer runs k times
  (15·h + 19·k·i/4); with checkpointing 2·h per layer (its input) plus one layer's full activations,
  recomputed.

    python scripts/memory_table.py [--gpus 8] [--tokens 8192]

--tokens: tokens per GPU per micro-batch (default 4 sequences of 2048).
"""

import argparse
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from stgc.moe import moe_layers, upcycle
from stgc.moe.upcycle import decoder_layers
from stgc.vlm.parameters import parameter_groups

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
# Qwen3-VL-30B-A3B's published sizes (its config.json); counted here: 31.07 B parameters, as published
VLMS = {
    "Qwen3-VL-30B-A3B": dict(
        model_type="qwen3_vl_moe",
        text_config=dict(
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            decoder_sparse_step=1,
            vocab_size=151936,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=27,
            hidden_size=1152,
            intermediate_size=4304,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[8, 16, 24],
        ),
    ),
}
VISION_PARAMS = 303_507_456  # CLIP ViT-L/14-336's visual tower (frozen in stage III)
TOP_K, EXPERTS = 2, 4
GIB = 2**30


def on_meta(auto_class: type, config: dict) -> torch.nn.Module:
    """The model of a config dict (with its `model_type`) built on the meta device: no memory, no download."""
    config = dict(config)
    with torch.device("meta"):
        return auto_class.from_config(AutoConfig.for_model(config.pop("model_type"), **config))


def numel(parameters) -> int:
    return sum(p.numel() for p in parameters)


def counts(config: dict) -> dict[str, int]:
    """Exact parameter counts of the upcycled LM (meta device) plus the vision tower and projector."""
    model = on_meta(AutoModelForCausalLM, config)
    with torch.device("meta"):
        upcycle(model, num_experts=EXPERTS, top_k=TOP_K, layers="every_other")
    hidden = config["hidden_size"]
    projector = 1024 * hidden + hidden + hidden * hidden + hidden  # mlp2x_gelu from ViT-L's 1024
    trained = numel(p for layer in moe_layers(model).values() for p in layer.parameters())
    largest_layer = max(numel(layer.parameters()) for layer in decoder_layers(model))
    total = numel(model.parameters()) + VISION_PARAMS + projector
    mlps = [(TOP_K if i % 2 else 1, config["intermediate_size"]) for i in range(config["num_hidden_layers"])]
    return {
        "total": total,
        "trained": trained,
        "largest_layer": largest_layer,
        "hidden": hidden,
        "mlps": mlps,
    }


def vlm_counts(config: dict) -> dict:
    """Exact parameter counts of a transformers MoE VLM (meta device), its experts and routers trained."""
    model = on_meta(AutoModelForImageTextToText, config)
    groups = parameter_groups(model)
    text = config["text_config"]
    layers = model.model.language_model.layers
    return {
        "total": numel(model.parameters()),
        "trained": numel(groups["experts"] + groups["routers"]),
        "largest_layer": max(numel(layer.parameters()) for layer in layers),
        "hidden": text["hidden_size"],
        "mlps": [(text["num_experts_per_tok"], text["moe_intermediate_size"])] * len(layers),
    }


def activation_bytes(sizes: dict, tokens: int, checkpointing: bool) -> float:
    """bf16 activations kept for backward (see the module docstring); sizes["mlps"]: (k, i) per layer."""
    h = sizes["hidden"]
    per_layer = [15 * h + 19 * k * i / 4 for k, i in sizes["mlps"]]
    per_token = 2 * h * len(per_layer) + max(per_layer) if checkpointing else sum(per_layer)
    return tokens * per_token


def per_gpu(sizes: dict, gpus: int, tokens: int, sharded: bool, ckpt: bool) -> float:
    """GiB per GPU: model states (+ one gathered layer under FSDP2) and activations."""
    states = 4 * sizes["total"] + 12 * sizes["trained"]
    if sharded:
        states = states / gpus + 8 * sizes["largest_layer"]  # fp32 weights and gradients of one unit
    return (states + activation_bytes(sizes, tokens, ckpt)) / GIB


def rows(models: dict[str, dict], count, gpus: int, tokens: int) -> list[str]:
    """A table row per model: parameters, trained, then DDP, DDP + ckpt, FSDP2, FSDP2 + ckpt per GPU."""
    lines = []
    for name, config in models.items():
        sizes = count(config)
        cells = [
            per_gpu(sizes, gpus, tokens, sharded, ckpt) for sharded in (False, True) for ckpt in (False, True)
        ]
        lines.append(
            f"| {name} | {sizes['total'] / 1e9:.2f} B | {sizes['trained'] / 1e9:.2f} B | "
            + " | ".join(f"{c:.0f} GiB" for c in cells)
            + " |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4 * 2048, help="tokens per GPU per micro-batch")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"stage III, {args.gpus} GPUs, {args.tokens} tokens per GPU per micro-batch, bf16-mixed, AdamW")
    columns = "| parameters | trained | DDP | DDP + ckpt | FSDP2 | FSDP2 + ckpt |"
    print(f"| LM (MoE 4×top-2, every other layer) {columns}")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows(LMS, counts, args.gpus, args.tokens)))
    print(f"\n| MoE VLM (its own experts and routers trained) {columns}")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows(VLMS, vlm_counts, args.gpus, args.tokens)))


if __name__ == "__main__":
    main()
