"""What STGC writes to TensorBoard besides scalars, on histogram steps: a cosine histogram per layer, the
layer × expert heatmap of conflict ratios, and the conflict picture."""

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from stgc.method import names
from stgc.method.probes import LayerConflicts
from stgc.method.statistics import LayerStats
from stgc.report.figures import conflict_heatmap


def write_conflict_images(
    writer: SummaryWriter,
    step: int,
    layer_names: list[str],
    layers: list[LayerConflicts],
    stats: list[LayerStats],
    picture: np.ndarray | None = None,
) -> None:
    """The cosines of each layer's assignments with a gradient as a histogram, the heatmap, and the
    conflict picture when there is one (H, W, 3)."""
    for name, conflicts in zip(layer_names, layers, strict=True):
        cosine = conflicts.cosine[conflicts.has_grad].detach().float().cpu()
        writer.add_histogram(names.metric(names.COSINE_HISTOGRAM, name), cosine, step)
    writer.add_image(
        names.CONFLICT_RATIO_HEATMAP, conflict_heatmap(layer_names, stats), step, dataformats="HWC"
    )
    if picture is not None:
        writer.add_image(names.CONFLICT_PICTURE, picture, step, dataformats="HWC")
