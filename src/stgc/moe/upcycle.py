"""Turn a dense transformers causal LM into an MoE one, and find/steer its MoE layers."""

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from stgc.moe.layer import SparseMoE


def upcycle(
    model: nn.Module,
    num_experts: int = 4,
    top_k: int = 2,
    layers: str | list[int] = "every_other",
    **moe_kwargs,
) -> nn.Module:
    """Replace chosen decoder layers' MLPs in place by SparseMoE layers of copies (MoE-LLaVA init)."""
    blocks = decoder_layers(model)
    hidden_size = model.config.get_text_config().hidden_size
    for i in _layer_indices(layers, len(blocks)):
        layer = blocks[i]
        if isinstance(layer.mlp, SparseMoE):
            raise ValueError(f"Decoder layer {i} is already a SparseMoE; upcycle a dense model.")
        layer.mlp = SparseMoE(layer.mlp, hidden_size, num_experts, top_k, **moe_kwargs)
    return model


def moe_layers(model: nn.Module) -> dict[str, SparseMoE]:
    """All SparseMoE layers of `model` by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseMoE)}


def short_layer_name(name: str) -> str:
    """ "language_model.model.layers.2.mlp" -> "layer_2" (the full name when there is no layer index)."""
    match = re.search(r"layers\.(\d+)\.", name)
    return f"layer_{match.group(1)}" if match else name


def moe_losses(model: nn.Module) -> tuple[Tensor, Tensor]:
    """Sum of load-balancing and z-losses over the MoE layers' last forward (zeros if none ran)."""
    records = [m.last_routing for m in moe_layers(model).values() if m.last_routing is not None]
    if not records:
        zero = torch.zeros((), device=next(model.parameters()).device)
        return zero, zero
    return torch.stack([r.aux_loss for r in records]).sum(), torch.stack([r.z_loss for r in records]).sum()


@contextmanager
def routing_context(
    model: nn.Module, token_mask: Tensor | None = None, modality: Tensor | None = None
) -> Iterator[None]:
    """Route only `token_mask` tokens (B, T) and record their `modality` (B, T) for the duration.

    The routed positions are found here, once for all layers (a nonzero: one host sync per forward).
    """
    if token_mask is not None and token_mask.dtype != torch.bool:
        raise ValueError(f"token_mask must be a bool tensor, got {token_mask.dtype}.")
    token_index = None if token_mask is None else token_mask.reshape(-1).nonzero().squeeze(1)  # (N,)
    routed_modality = None
    if modality is not None and token_index is not None and modality.shape == token_mask.shape:
        routed_modality = modality.reshape(-1).index_select(0, token_index)  # (N,)
    layers = list(moe_layers(model).values())
    for layer in layers:
        layer.token_mask, layer.token_index = token_mask, token_index
        layer.modality, layer.routed_modality = modality, routed_modality
    try:
        yield
    finally:
        for layer in layers:
            layer.token_mask = layer.token_index = layer.modality = layer.routed_modality = None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The first ModuleList of blocks that each have an `mlp` (e.g. model.model.layers)."""
    root = model.get_decoder() if hasattr(model, "get_decoder") else model
    for module in root.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(hasattr(b, "mlp") for b in module):
            return module
    raise ValueError(f"No decoder layers with an `mlp` found in {type(model).__name__}.")


def _layer_indices(layers: str | list[int], num_layers: int) -> list[int]:
    """Resolve `layers` ("every_other", "all" or explicit indices) against the model depth."""
    if layers == "every_other":
        return list(range(0, num_layers, 2))
    if layers == "all":
        return list(range(num_layers))
    if isinstance(layers, str):
        raise ValueError(f"layers ({layers!r}) must be 'every_other', 'all' or a list of ints.")
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < num_layers]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(f"layers ({list(layers)}) must be distinct ints in [0, {num_layers}); bad: {bad}.")
    return sorted(layers)
