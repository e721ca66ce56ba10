"""The figures STGC draws, as (H, W, 3) uint8 RGB arrays: the layer × expert heatmap of conflict ratios,
and the conflict picture (a sample's image patches and text tokens shaded by how much they conflict).
matplotlib is imported only when a figure is due: the import is slow."""

import io

import numpy as np
import torch
from PIL import Image

from stgc.method.statistics import LayerStats


def token_grid(image_share: np.ndarray, grid: tuple[int, int], pool: int, keep_cls: bool) -> np.ndarray:
    """The (P,) shares of an image's tokens, in the vision tower's order (CLS first when kept, then
    the pooled patch grid row by row), as the (grid_h / pool, grid_w / pool) grid of the cells they
    cover: a token covers pool x pool patches, the CLS token none (it is dropped)."""
    return image_share[int(keep_cls) :].reshape(grid[0] // pool, grid[1] // pool)


COLOURMAP = "Reds"  # of the share: 0 white, 1 deep red
NO_SHARE = (0.8, 0.8, 0.8)  # the text boxes of tokens without a share (not routed, no assignment)
FONT_SIZE = 10  # points, of the token boxes
CHAR_WIDTH = 0.6 * FONT_SIZE / 72  # inches: a monospace glyph's advance is about 0.6 of its size


def shade(image: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """The (H, W, 3) image in [0, 1] in grey (its own colours cannot pass for shading; see
    `_stretched_luma`), each cell of the (h, w) `shares` grid (H, W multiples of h, w) blended with
    its share's colour, as opaque as the share is high (0 and NaN: grey only)."""
    import matplotlib

    grey = _stretched_luma(image)[..., None]  # (H, W, 1)
    known = np.nan_to_num(shares)  # (h, w)
    colours = matplotlib.colormaps[COLOURMAP](known)[..., :3]  # (h, w, 3)
    opacity = 0.85 * known[..., None]  # (h, w, 1)
    scale = (image.shape[0] // shares.shape[0], image.shape[1] // shares.shape[1])
    colours = colours.repeat(scale[0], axis=0).repeat(scale[1], axis=1)  # (H, W, 3)
    opacity = opacity.repeat(scale[0], axis=0).repeat(scale[1], axis=1)  # (H, W, 1)
    return (1 - opacity) * grey + opacity * colours


def _stretched_luma(image: np.ndarray) -> np.ndarray:
    """The (H, W) brightness of an (H, W, 3) image, stretched to [0.3, 1] (a yellow shape on white
    stays visible; the floor keeps the shading's colours readable on dark pixels)."""
    luma = image @ np.array([0.299, 0.587, 0.114])  # (H, W)
    return 0.3 + 0.7 * (luma - luma.min()) / max(luma.max() - luma.min(), 1e-6)


def conflict_figure(
    image: np.ndarray, shares: np.ndarray, tokens: list[str], token_shares: np.ndarray, title: str
) -> np.ndarray:
    """The picture as an (H, W, 3) uint8 RGB array: a title; the (H, W, 3) input image beside the
    same image shaded by the (h, w) grid of its tokens' `shares` (see `shade`; hatched where NaN;
    the value printed in each cell when there are at most 8 x 8), and a colour bar; beneath them the
    text `tokens` as boxes coloured by `token_shares` (grey and hatched where NaN). Sizes in inches
    at 100 dpi."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    width, side, line_height = 7.5, 3.0, 0.3  # figure width, each image's side, a text line
    places = _wrap([len(token) for token in tokens], columns=int((width - 0.4) / CHAR_WIDTH))
    text_height = line_height * (max((line for line, _ in places), default=0) + 1) + 0.2
    height = 0.7 + side + 0.2 + text_height  # title and panel titles, images, gap, text
    figure = plt.figure(figsize=(width, height), dpi=100)
    figure.suptitle(title, y=1 - 0.08 / height, va="top", fontsize=11)
    bottom = (text_height + 0.2) / height
    inputs = figure.add_axes((0.2 / width, bottom, side / width, side / height))
    inputs.imshow(image, interpolation="nearest")
    inputs.set_title("input", fontsize=10)
    picture = figure.add_axes((0.4 / width + side / width, bottom, side / width, side / height))
    shaded = shade(image, shares)  # (H, W, 3)
    picture.imshow(shaded, interpolation="nearest")
    picture.set_title("conflict share of its image tokens", fontsize=10)
    cell = (image.shape[0] / shares.shape[0], image.shape[1] / shares.shape[1])  # pixels per token
    labelled = shares.size <= 64  # cells large enough for their value and a border
    for row in range(1, shares.shape[0]) if labelled else ():
        picture.axhline(
            row * cell[0] - 0.5, color="0.7", linewidth=0.5
        )  # imshow's pixel centres are integers
    for column in range(1, shares.shape[1]) if labelled else ():
        picture.axvline(column * cell[1] - 0.5, color="0.7", linewidth=0.5)
    for (row, column), share in np.ndenumerate(shares):
        corner = (column * cell[1] - 0.5, row * cell[0] - 0.5)
        if np.isnan(share):
            picture.add_patch(
                Rectangle(corner, cell[1], cell[0], fill=False, hatch="//", linewidth=0, color="0.35")
            )
        elif labelled:
            y, x = int((row + 0.5) * cell[0]), int((column + 0.5) * cell[1])
            under = shaded[y - 4 : y + 4, max(x - 12, 0) : x + 12].mean()  # the brightness behind the label
            ink = "white" if under < 0.5 else "black"
            picture.text(x - 0.5, y - 0.5, f"{share:.2f}", ha="center", va="center", fontsize=8, color=ink)
    for axes in (inputs, picture):  # a thin frame, no ticks
        axes.set_xticks([])
        axes.set_yticks([])
        for spine in axes.spines.values():
            spine.set_color("0.7")
    colour_bar = figure.add_axes(((0.55 + 2 * side) / width, bottom, 0.15 / width, side / height))
    mappable = plt.cm.ScalarMappable(Normalize(0.0, 1.0), COLOURMAP)
    figure.colorbar(mappable, cax=colour_bar, label="conflict share")
    text = figure.add_axes((0.2 / width, 0.1 / height, (width - 0.4) / width, text_height / height))
    text.set_xlim(0, width - 0.4)
    text.set_ylim(text_height, 0)  # inches from the top
    text.set_axis_off()
    for token, share, (line, column) in zip(tokens, token_shares, places, strict=True):
        known = not np.isnan(share)
        text.text(
            column * CHAR_WIDTH, 0.1 + line * line_height, token, family="monospace", fontsize=FONT_SIZE,
            va="top", color="white" if share > 0.6 else "black",
            bbox={
                "facecolor": mappable.to_rgba(float(share))[:3] if known else NO_SHARE, "hatch": None if known else "//",
                "edgecolor": (0.6, 0.6, 0.6), "linewidth": 0.5, "boxstyle": "square,pad=0.2",
            },
        )  # fmt: skip
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return np.array(Image.open(buffer).convert("RGB"))


def _wrap(lengths: list[int], columns: int) -> list[tuple[int, int]]:
    """The (line, column) of each token when tokens of these lengths, a space apart, fill lines of
    `columns` characters."""
    places, line, column = [], 0, 0
    for length in lengths:
        if column and column + length > columns:
            line, column = line + 1, 0
        places.append((line, column))
        column += length + 1
    return places


def as_display_image(
    pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], scale: int
) -> np.ndarray:
    """A normalised (3, H, W) model input back as an (H * scale, W * scale, 3) image in [0, 1]."""
    shift, spread = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]  # (3, 1, 1)
    image = pixels.detach().float().cpu() * spread + shift  # (3, H, W)
    image = image.clamp(0, 1).permute(1, 2, 0).numpy()  # (H, W, 3)
    return image.repeat(scale, axis=0).repeat(scale, axis=1)


def conflict_heatmap(layer_names: list[str], stats: list[LayerStats]) -> torch.Tensor:
    """The (layers, experts) conflict ratios as an RGB image (H, W, 3) uint8: values printed in the
    cells, colours scaled to the data's range."""
    import matplotlib.pyplot as plt

    ratios = torch.stack([s.conflicts / s.assignments.clamp(min=1) for s in stats]).cpu().numpy()
    figure, axes = plt.subplots(figsize=(1.5 + 0.8 * ratios.shape[1], 1.0 + 0.5 * ratios.shape[0]), dpi=100)
    shown = axes.imshow(
        ratios, vmin=ratios.min(), vmax=max(ratios.max(), ratios.min() + 1e-6), cmap="viridis"
    )
    middle = (ratios.min() + ratios.max()) / 2
    for (row, column), value in np.ndenumerate(ratios):
        colour = "black" if value > middle else "white"
        axes.text(column, row, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=8)
    axes.set_xlabel("expert")
    axes.set_xticks(range(ratios.shape[1]))
    axes.set_yticks(range(len(layer_names)), layer_names)
    figure.colorbar(shown, ax=axes, label="conflict ratio")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    return torch.from_numpy(np.array(Image.open(buffer).convert("RGB")))
