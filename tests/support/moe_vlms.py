"""Tiny random transformers MoE models whose routers do not share one rule: Mixtral, Qwen3-MoE and
Qwen3-VL-MoE (softmax), GLM-4.5V and DeepSeek-V3 (sigmoid, correction bias, group-limited top-k), Aria
(softmax over the chosen logits), ERNIE-4.5-VL (softmax with a correction bias, experts per modality),
Llama 4 (sigmoid top-k scaling the experts' input). Built from configs on the CPU; the correction biases
are drawn at random, as a trained model's are not zero."""

import torch
from torch import nn
from transformers import (
    AriaConfig,
    AriaForConditionalGeneration,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Ernie4_5_VLMoeConfig,
    Ernie4_5_VLMoeForConditionalGeneration,
    Glm4vMoeConfig,
    Glm4vMoeForConditionalGeneration,
    Llama4Config,
    Llama4ForConditionalGeneration,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

IMAGE, VIDEO, START, END = 100, 101, 98, 99  # token ids of image/video placeholders and their brackets
TEXT = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256}  # fmt: skip
ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def mixtral() -> PreTrainedModel:
    return MixtralForCausalLM(MixtralConfig(**TEXT, num_local_experts=4, num_experts_per_tok=2))


def qwen3_moe() -> PreTrainedModel:
    config = Qwen3MoeConfig(
        **TEXT, moe_intermediate_size=16, head_dim=16, num_experts=4, num_experts_per_tok=2
    )
    return Qwen3MoeForCausalLM(config)


def qwen3_vl_moe() -> PreTrainedModel:
    config = Qwen3VLMoeConfig(
        text_config={**TEXT, "moe_intermediate_size": 16, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                     "decoder_sparse_step": 1,
                     "rope_parameters": {**ROPE, "mrope_section": [4, 2, 2], "mrope_interleaved": True}},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
                       "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 32,
                       "num_position_embeddings": 16, "deepstack_visual_indexes": [0]},
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
    )  # fmt: skip
    return Qwen3VLMoeForConditionalGeneration(config)


def glm4v_moe() -> PreTrainedModel:
    config = Glm4vMoeConfig(
        text_config={**TEXT, "moe_intermediate_size": 16, "n_routed_experts": 8, "num_experts_per_tok": 2,
                     "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 0,
                     "norm_topk_prob": True, "routed_scaling_factor": 1.0,
                     "rope_parameters": {**ROPE, "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
                       "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 32, "image_size": 56},
        image_token_id=IMAGE, video_token_id=VIDEO, image_start_token_id=START, image_end_token_id=END,
    )  # fmt: skip
    return _random_biases(Glm4vMoeForConditionalGeneration(config))


def deepseek_v3() -> PreTrainedModel:
    config = DeepseekV3Config(
        **{**TEXT, "num_key_value_heads": 2}, moe_intermediate_size=16, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_parameters=ROPE, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return _random_biases(DeepseekV3ForCausalLM(config))


def aria() -> PreTrainedModel:
    text = {**TEXT, "intermediate_size": 16}
    config = AriaConfig(
        text_config={**text, "model_type": "aria_text", "moe_num_experts": 4, "moe_topk": 2,
                     "moe_num_shared_experts": 1, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 56, "patch_size": 14},
        projector_patch_to_query_dict={16: 4}, image_token_index=IMAGE,
    )  # fmt: skip
    return AriaForConditionalGeneration(config)


def ernie4_5_vl_moe() -> PreTrainedModel:
    config = Ernie4_5_VLMoeConfig(
        text_config={**TEXT, "moe_intermediate_size": [16, 8], "moe_num_experts": 4, "moe_k": 2,
                     "moe_num_shared_experts": 1, "rope_parameters": {**ROPE, "mrope_section": [3, 3, 2]}},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_merge_size": 2},
        image_token_id=IMAGE, video_token_id=VIDEO, image_start_token_id=START, image_end_token_id=END,
    )  # fmt: skip
    return _random_biases(Ernie4_5_VLMoeForConditionalGeneration(config))


def llama4() -> PreTrainedModel:
    config = Llama4Config(
        text_config={**TEXT, "intermediate_size": 16, "intermediate_size_mlp": 64, "head_dim": 16,
                     "num_local_experts": 4, "num_experts_per_tok": 2, "attention_chunk_size": 64,
                     "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128,
                       "image_size": 56, "patch_size": 14, "pixel_shuffle_ratio": 0.5, "projector_input_dim": 64,
                       "projector_output_dim": 64, "vision_output_dim": 64},
        image_token_index=IMAGE, boi_token_index=START, eoi_token_index=END,
    )  # fmt: skip
    return Llama4ForConditionalGeneration(config)


FAMILIES = {  # name -> (builder, the router's score family, whether its choice adds a correction bias)
    "mixtral": (mixtral, "softmax", False),
    "qwen3_moe": (qwen3_moe, "softmax", False),
    "qwen3_vl_moe": (qwen3_vl_moe, "softmax", False),
    "glm4v_moe": (glm4v_moe, "sigmoid", True),
    "deepseek_v3": (deepseek_v3, "sigmoid", True),
    "aria": (aria, "softmax", False),
    "ernie4_5_vl_moe": (ernie4_5_vl_moe, "softmax", True),
    "llama4": (llama4, "sigmoid", False),
}


def _random_biases(model: PreTrainedModel) -> PreTrainedModel:
    torch.manual_seed(0)
    for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
        if name.endswith("e_score_correction_bias"):
            tensor.data.normal_(0, 0.1)
    return model


def router_of(model: nn.Module, weight: nn.Parameter) -> nn.Module:
    """The router module that owns `weight` (a probe's router weight)."""
    return next(m for m in model.modules() if getattr(m, "weight", None) is weight)


def routed(router: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's own (N, k) weights and (N, k) chosen experts for (N, H) tokens, whichever order its
    forward returns them in (Aria: indices first; Llama 4: a dense (N, E) score matrix and the logits)."""
    outputs = router(tokens)
    if all(t.is_floating_point() for t in outputs):  # Llama 4: 0 for the experts not chosen
        scores = outputs[0]
        indices = scores.topk(router.top_k, dim=-1).indices
        return scores.gather(1, indices), indices
    indices = next(t for t in outputs if not t.is_floating_point())
    weights = next(t for t in outputs if t.is_floating_point() and t.shape == indices.shape)
    return weights, indices
