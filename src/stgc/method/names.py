"""Every name STGC logs under, defined once: `stgc/<quantity>/<layer>` (and `/expert_<e>` per expert),
used by the core, the integrations, the TensorBoard layout, the study and the scripts."""

PREFIX = "stgc"
ALL_LAYERS = "all"  # the layer name of the figures over all MoE layers

# per layer, and over all layers (ALL_LAYERS)
CONFLICT_RATIO = "conflict_ratio"  # share of the assignments with a gradient that conflict
CONFLICT_RATIO_TEXT = "conflict_ratio_text"  # ... of text tokens
CONFLICT_RATIO_IMAGE = "conflict_ratio_image"  # ... of image tokens
COSINE_MEAN = "cosine_mean"
COSINE_NULL = "cosine_null"  # the cosine's null level (orthogonal token gradients)
COSINE_STD = "cosine_std"
CEL_LOSS = "cel_loss"
# per layer only
EXPERT_DRIFT = "expert_drift"
CEL_GRAD_RATIO = "cel_grad_ratio"  # ‖CEL router gradient‖ / ‖the rest of the router's gradient‖
REROUTE_RATE = "reroute_rate"  # of the flagged pairs, the share whose expert left the token's top-k
DELTA_P_FLAGGED = "delta_p_flagged"
DELTA_P_OTHER = "delta_p_other"
EXACT_OUTPUT_PEARSON = "exact_output_pearson"
COSINE_HISTOGRAM = "cosine"  # a histogram
# per layer and expert
EXPERT_LOAD = "expert_load"
EXPERT_CONFLICT_RATIO = "expert_conflict_ratio"
# one per run
SKIPPED_NONFINITE = f"{PREFIX}/skipped_nonfinite"
CONFLICT_RATIO_HEATMAP = f"{PREFIX}/conflict_ratio_heatmap"  # an image
CONFLICT_PICTURE = f"{PREFIX}/conflict_picture"  # an image


def metric(quantity: str, layer: str = ALL_LAYERS, expert: int | None = None) -> str:
    """The logged name of a quantity of one layer (or of all layers), or of one of its experts."""
    name = f"{PREFIX}/{quantity}/{layer}"
    return name if expert is None else f"{name}/expert_{expert}"


def layer_of(name: str, quantity: str) -> str | None:
    """The MoE layer a logged name gives `quantity` of (`stgc/<quantity>/<layer>`); None for another
    quantity, the figure over all layers, or an expert's."""
    prefix = f"{PREFIX}/{quantity}/"
    layer = name.removeprefix(prefix)
    return layer if name.startswith(prefix) and layer != ALL_LAYERS and "/" not in layer else None
