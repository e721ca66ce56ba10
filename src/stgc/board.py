"""What STGC shows in TensorBoard besides plain scalars: a custom-scalars layout that groups the
`stgc/` and `moe/` charts per MoE layer (one chart per quantity, a line per expert), and the conflict
picture (a sample's image patches and text tokens shaded by how much they conflict).

Metric names, as logged: `stgc/<quantity>/<layer>` and `stgc/<quantity>/<layer>/expert_<e>` by the
STGC callback (stgc.conflict.statistics.layer_metrics), `moe/<layer>/<quantity>` and
`moe/<layer>/<quantity>/expert_<e>` by LVLMModule (stgc.moe.routing_stats).
"""

import io
import re

import numpy as np
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

ALL_LAYERS = "all"  # the layer name of the callback's figures over all layers
# (chart title, regex of its lines); "{layer}" stands for the escaped layer name
CONFLICT_RATIO = ("conflict ratio: all, text, image tokens", r"stgc/conflict_ratio(_text|_image)?/{layer}")
COSINE = ("cosine mean and its null level", r"stgc/cosine_(mean|null)/{layer}")
COSINE_STD = ("cosine std", r"stgc/cosine_std/{layer}")
CEL = ("conflict elimination loss", r"stgc/cel_loss/{layer}")
STGC_CHARTS = (
    CONFLICT_RATIO,
    ("conflict ratio per expert", r"stgc/expert_conflict_ratio/{layer}/expert_\d+"),
    COSINE,
    COSINE_STD,
    CEL,
    ("CEL / rest of the router gradient norm", r"stgc/cel_grad_ratio/{layer}"),
    ("reroute rate of flagged pairs", r"stgc/reroute_rate/{layer}"),
    ("change of p(t, e): flagged and other pairs", r"stgc/delta_p_(flagged|other)/{layer}"),
    ("expert drift", r"stgc/expert_drift/{layer}"),
    ("exact vs output cosine: Pearson r", r"stgc/exact_output_pearson/{layer}"),
    ("load of the measured assignments per expert", r"stgc/expert_load/{layer}/expert_\d+"),
)
MOE_CHARTS = (
    ("router load per expert", r"moe/{layer}/load/expert_\d+"),
    ("text-token load per expert", r"moe/{layer}/load_text/expert_\d+"),
    ("image-token load per expert", r"moe/{layer}/load_image/expert_\d+"),
    ("router entropy", r"moe/{layer}/entropy"),
    ("load-balancing loss", r"moe/{layer}/aux_loss"),
    ("dropped fraction", r"moe/{layer}/dropped_fraction"),
)
ALL_LAYER_CHARTS = (  # the callback's figures over all layers
    CONFLICT_RATIO,
    COSINE,
    COSINE_STD,
    CEL,
    ("non-finite steps skipped", "stgc/skipped_nonfinite"),
    ("load-balancing loss, summed over layers", "train/aux_loss"),
)


def custom_scalars_layout(layer_names: list[str], stgc: bool = True) -> dict[str, dict[str, list]]:
    """The layout `SummaryWriter.add_custom_scalars` takes: a category per MoE layer (and one over
    all layers when `stgc`) holding its `moe/` charts and, when `stgc`, its `stgc/` charts; every
    chart a multiline chart of the metrics its anchored regex matches."""
    per_layer = (*STGC_CHARTS, *MOE_CHARTS) if stgc else MOE_CHARTS
    groups = [(f"{ALL_LAYERS} layers", ALL_LAYERS, ALL_LAYER_CHARTS)] if stgc else []
    groups += [(layer, layer, per_layer) for layer in layer_names]
    return {
        category: {
            title: ["Multiline", [f"^{pattern.format(layer=re.escape(layer))}$"]] for title, pattern in charts
        }
        for category, layer, charts in groups
    }


def write_custom_scalars(writer: SummaryWriter, layer_names: list[str], stgc: bool = True) -> None:
    """Write the layout of `custom_scalars_layout` to a run (TensorBoard reads a run's first one)."""
    writer.add_custom_scalars(custom_scalars_layout(layer_names, stgc))


# -- the conflict picture -----------------------------------------------------------------------------
def patch_shares(image_share: np.ndarray, grid: tuple[int, int], pool: int, keep_cls: bool) -> np.ndarray:
    """The (grid_h, grid_w) shares of the patches from the (P,) shares of an image's tokens, in the
    vision tower's order (CLS first when kept, then the pooled grid row by row): a pooled token
    covers pool x pool patches; the CLS token covers none."""
    cells = image_share[int(keep_cls) :].reshape(grid[0] // pool, grid[1] // pool)  # (h/pool, w/pool)
    return cells.repeat(pool, axis=0).repeat(pool, axis=1)  # (grid_h, grid_w)


def shade(image: np.ndarray, shares: np.ndarray, colormap: str = "magma", alpha: float = 0.55) -> np.ndarray:
    """An (H, W, 3) float image in [0, 1] with each cell of the (h, w) `shares` grid blended with its
    share's colour (H, W multiples of h, w); NaN cells are left as they are."""
    import matplotlib

    colours = matplotlib.colormaps[colormap](np.nan_to_num(shares))[..., :3]  # (h, w, 3)
    scale = (image.shape[0] // shares.shape[0], image.shape[1] // shares.shape[1])
    colours = colours.repeat(scale[0], axis=0).repeat(scale[1], axis=1)  # (H, W, 3)
    known = ~np.isnan(shares).repeat(scale[0], axis=0).repeat(scale[1], axis=1)  # (H, W)
    blended = (1 - alpha) * image + alpha * colours
    return np.where(known[..., None], blended, image)


def conflict_figure(
    image: np.ndarray, shares: np.ndarray, tokens: list[str], token_shares: np.ndarray, title: str
) -> np.ndarray:
    """The picture as an (H, W, 3) uint8 RGB array: the (H, W, 3) image shaded by the patch grid's
    `shares` (see `shade`), beneath it the text `tokens` as boxes coloured by `token_shares`
    (grey where NaN), a colour bar of the share and a title."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    colormap, norm = plt.get_cmap("magma"), Normalize(0.0, 1.0)
    figure = plt.figure(figsize=(7.0, 7.5), dpi=100)
    picture = figure.add_axes((0.05, 0.38, 0.75, 0.52))
    picture.imshow(shade(image, shares, colormap.name), interpolation="nearest")
    picture.set_xticks([])
    picture.set_yticks([])
    picture.set_title(title, fontsize=10)
    colour_bar = figure.add_axes((0.83, 0.38, 0.03, 0.52))
    figure.colorbar(plt.cm.ScalarMappable(norm, colormap), cax=colour_bar, label="conflict share")
    text = figure.add_axes((0.02, 0.01, 0.96, 0.34))
    text.set_axis_off()
    _token_boxes(text, tokens, token_shares, colormap)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return np.array(Image.open(buffer).convert("RGB"))


def _token_boxes(axes, tokens: list[str], shares: np.ndarray, colormap) -> None:
    """Lay the tokens out left to right in lines, each a box filled with its share's colour."""
    columns, line_height = 70, 0.09  # characters per line, in the axes' height per line
    column, line = 0, 0
    for token, share in zip(tokens, shares, strict=True):
        width = len(token) + 1
        if column + width > columns and column > 0:
            column, line = 0, line + 1
        fill = (0.85, 0.85, 0.85) if np.isnan(share) else colormap(float(share))[:3]
        ink = "black" if np.isnan(share) or share > 0.5 else "white"
        axes.text(
            column / columns, 1 - line * line_height, token, family="monospace", fontsize=9, va="top",
            color=ink, bbox={"facecolor": fill, "edgecolor": "none", "boxstyle": "square,pad=0.15"},
        )  # fmt: skip
        column += width


def as_display_image(
    pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], scale: int
) -> np.ndarray:
    """A normalised (3, H, W) model input back as an (H * scale, W * scale, 3) image in [0, 1]."""
    shift, spread = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]  # (3, 1, 1)
    image = pixels.detach().float().cpu() * spread + shift  # (3, H, W)
    image = image.clamp(0, 1).permute(1, 2, 0).numpy()  # (H, W, 3)
    return image.repeat(scale, axis=0).repeat(scale, axis=1)
