"""What STGC writes to TensorBoard: a step's scalars as one event, and on histogram steps a cosine
histogram per layer, the layer × expert heatmap of conflict ratios, and the conflict picture."""

import numpy as np
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter

from stgc.method import names
from stgc.method.probes import LayerConflicts
from stgc.method.statistics import LayerStats
from stgc.report.figures import conflict_heatmap


def write_scalars(writer: SummaryWriter, scalars: dict[str, float], step: int) -> None:
    """All of a step's scalars in one event: what `add_scalar` writes for each, at a tenth of its cost
    (~60 µs a scalar there, about half of a logging step's extra time on the quick bench shape)."""
    values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()]
    writer._get_file_writer().add_summary(Summary(value=values), step)


def write_conflict_images(
    writer: SummaryWriter,
    step: int,
    layer_names: list[str],
    layers: list[LayerConflicts],
    stats: list[LayerStats],
    picture: np.ndarray | None = None,
) -> None:
    """The cosines of each layer's assignments with a gradient as a histogram (none for a layer without
    one: ERNIE-4.5-VL's last vision experts, whose image tokens reach no label), the heatmap, and the
    conflict picture when there is one (H, W, 3)."""
    for name, conflicts in zip(layer_names, layers, strict=True):
        cosine = conflicts.cosine[conflicts.has_grad].detach().float().cpu()
        if cosine.numel():
            writer.add_histogram(names.metric(names.COSINE_HISTOGRAM, name), cosine, step)
    writer.add_image(
        names.CONFLICT_RATIO_HEATMAP, conflict_heatmap(layer_names, stats), step, dataformats="HWC"
    )
    if picture is not None:
        writer.add_image(names.CONFLICT_PICTURE, picture, step, dataformats="HWC")
