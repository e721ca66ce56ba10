"""FSDP2 for the LVLM: torch's `fully_shard` on each decoder layer, the vision tower and the whole
model, over the data-parallel mesh Lightning's ModelParallelStrategy hands to `configure_model`."""

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from stgc.model.lvlm import LVLM
from stgc.moe.upcycle import decoder_layers


def fully_shard_lvlm(model: LVLM, mesh: DeviceMesh) -> None:
    """Shard every parameter over `mesh`; each decoder layer (MoE layers included) and the vision
    tower is one unit, gathered for its forward and backward only. The root unit holds the rest
    (embeddings, LM head, projector). Done once: a module already sharded is left as it is."""
    if isinstance(model, FSDPModule):
        return
    for layer in decoder_layers(model.language_model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model.vision_tower, mesh=mesh)
    fully_shard(model, mesh=mesh)
