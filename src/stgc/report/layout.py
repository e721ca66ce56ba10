"""TensorBoard's custom-scalars layout: the `stgc/` and `moe/` charts grouped per MoE layer (one chart
per quantity, a line per expert), after an overview of all layers.

Metric names: `stgc/...` as stgc.method.names defines them, `moe/<layer>/<quantity>` and
`moe/<layer>/<quantity>/expert_<e>` as LVLMModule logs them (stgc.moe.routing_stats).
"""

import re
import weakref

from torch.utils.tensorboard import SummaryWriter

from stgc.method import names as n

# (chart title, regex of its lines); "{layer}" stands for the escaped layer name


def _stgc(*quantities: str, layer: str = "{layer}", expert: bool = False) -> str:
    """The regex of the `stgc/` metrics of `quantities` of a layer (of each expert)."""
    return n.metric(f"({'|'.join(quantities)})", layer) + (r"/expert_\d+" if expert else "")


CONFLICT_RATIO = (
    "conflict ratio: all, text, image tokens",
    _stgc(n.CONFLICT_RATIO, n.CONFLICT_RATIO_TEXT, n.CONFLICT_RATIO_IMAGE),
)
COSINE = ("cosine mean and its null level", _stgc(n.COSINE_MEAN, n.COSINE_NULL))
COSINE_STD = ("cosine std", _stgc(n.COSINE_STD))
CEL = ("conflict elimination loss", _stgc(n.CEL_LOSS))
STGC_CHARTS = (
    CONFLICT_RATIO,
    ("conflict ratio per expert", _stgc(n.EXPERT_CONFLICT_RATIO, expert=True)),
    COSINE,
    COSINE_STD,
    CEL,
    ("CEL / rest of the router gradient norm", _stgc(n.CEL_GRAD_RATIO)),
    ("reroute rate of flagged pairs", _stgc(n.REROUTE_RATE)),
    ("change of p(t, e): flagged and other pairs", _stgc(n.DELTA_P_FLAGGED, n.DELTA_P_OTHER)),
    ("expert drift", _stgc(n.EXPERT_DRIFT)),
    ("exact vs output cosine: Pearson r", _stgc(n.EXACT_OUTPUT_PEARSON)),
    ("load of the measured assignments per expert", _stgc(n.EXPERT_LOAD, expert=True)),
)
MOE_CHARTS = (
    ("router load per expert", r"moe/{layer}/load/expert_\d+"),
    ("text-token load per expert", r"moe/{layer}/load_text/expert_\d+"),
    ("image-token load per expert", r"moe/{layer}/load_image/expert_\d+"),
    ("router entropy", r"moe/{layer}/entropy"),
    ("load-balancing loss", r"moe/{layer}/aux_loss"),
    ("dropped fraction", r"moe/{layer}/dropped_fraction"),
)
OVERVIEW_CHARTS = (  # the callback's figures over all layers, and the step diagnostics of every layer
    CONFLICT_RATIO,
    COSINE,
    CEL,
    ("reroute rate of flagged pairs, per layer", _stgc(n.REROUTE_RATE, layer="[^/]+")),
    ("change of p(t, e) of flagged pairs, per layer", _stgc(n.DELTA_P_FLAGGED, layer="[^/]+")),
    COSINE_STD,
    ("non-finite steps skipped", n.SKIPPED_NONFINITE),
    ("load-balancing loss, summed over layers", "train/aux_loss"),
)
OVERVIEW = "STGC: all layers"  # its category title


def custom_scalars_layout(
    layer_names: list[str], stgc: bool = True, moe: bool = True
) -> dict[str, dict[str, list]]:
    """The layout `SummaryWriter.add_custom_scalars` takes. With `stgc`: first an overview category
    (the callback's figures over all layers, each layer's reroute rate), then a category per MoE layer
    with its `stgc/` charts before its `moe/` charts (with `moe`: LVLMModule logs those); without, a
    category per layer of `moe/` charts.
    Every chart is a multiline chart of the metrics its anchored regex matches.

    TensorBoard merges the layouts of a folder's runs by category title, dropping repeated charts, in
    the order of the run it reads first: `make train`'s two stage III arms both run the callback, so
    they share one layout; a run without it adds no chart of its own."""
    per_layer = (*(STGC_CHARTS if stgc else ()), *(MOE_CHARTS if moe else ()))
    groups = [(OVERVIEW, n.ALL_LAYERS, OVERVIEW_CHARTS)] if stgc else []
    groups += [(layer, layer, per_layer) for layer in layer_names]
    return {
        category: {
            title: ["Multiline", [f"^{pattern.format(layer=re.escape(layer))}$"]] for title, pattern in charts
        }
        for category, layer, charts in groups
    }


_written: "weakref.WeakSet[SummaryWriter]" = weakref.WeakSet()  # the runs that have their layout


def write_custom_scalars(
    writer: SummaryWriter, layer_names: list[str], stgc: bool = True, moe: bool = True
) -> None:
    """Write the layout of `custom_scalars_layout` to a run, once: TensorBoard reads a run's first layout,
    so the first writer wins — the STGC callback's (its on_fit_start runs before the LightningModule's),
    else LVLMModule's MoE-only one."""
    if writer in _written:
        return
    _written.add(writer)
    writer.add_custom_scalars(custom_scalars_layout(layer_names, stgc, moe))
