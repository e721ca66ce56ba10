"""Vision-to-language projector."""

from torch import nn


def build_projector(kind: str, vision_size: int, text_size: int) -> nn.Module:
    """LLaVA-1.5's projectors: "linear", or "mlp2x_gelu" (Linear, GELU, Linear)."""
    if kind == "linear":
        return nn.Linear(vision_size, text_size)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_size, text_size), nn.GELU(), nn.Linear(text_size, text_size))
    raise ValueError(f"projector={kind!r}: expected 'linear' or 'mlp2x_gelu'")
