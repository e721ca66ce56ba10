"""The planted task's model: input projection, one MLP block (an MoE layer after upcycling), a class
head; and the LightningModule that trains it, densely or as stage III (experts and routers only)."""

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from stgc.moe import SparseMoE, moe_losses
from stgc_experiments.planted.task import CLASSES, INPUT_DIM

HIDDEN = 32  # H
INNER = 64  # the MLP's inner width


class PlantedModel(nn.Module):
    """logits = head(h + mlp(h)), h = embed([x, onehot(family)]): the cue sits in what the router sees."""

    def __init__(self, families: int) -> None:
        super().__init__()
        self.families = families
        self.embed = nn.Linear(INPUT_DIM + families, HIDDEN)
        self.mlp: nn.Module = nn.Sequential(nn.Linear(HIDDEN, INNER), nn.GELU(), nn.Linear(INNER, HIDDEN))
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: Tensor, family: Tensor) -> Tensor:
        cue = F.one_hot(family, self.families).to(x.dtype)  # (B, F)
        h = self.embed(torch.cat([x, cue], dim=-1))  # (B, H)
        return self.head(h + self.mlp(h))  # (B, C)

    def upcycle(self, num_experts: int, top_k: int) -> SparseMoE:
        """The MLP becomes `num_experts` exact copies behind a top-k router (MoE-LLaVA's stage III)."""
        self.mlp = SparseMoE(self.mlp, HIDDEN, num_experts, top_k)
        return self.mlp


class PlantedModule(L.LightningModule):
    """Cross-entropy on the labels (+ the load-balancing loss once upcycled). Dense: everything trains;
    upcycled: the experts and the router only, as in stage III."""

    def __init__(
        self,
        model: PlantedModel,
        train: dict[str, Tensor],
        seed: int,
        lr: float = 3e-3,
        batch_size: int = 256,
        aux_coef: float = 0.01,
    ) -> None:
        super().__init__()
        self.model = model
        self.train_data = train
        self.seed = seed
        self.lr = lr
        self.batch_size = batch_size
        self.aux_coef = aux_coef

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = task_loss(self.model(batch["x"], batch["family"]), batch).mean()
        self.log("train/lm_loss", loss, on_step=True, on_epoch=False)
        if isinstance(self.model.mlp, SparseMoE):
            aux_loss = moe_losses(self.model)[0]
            loss = loss + self.aux_coef * aux_loss
            self.log("train/aux_loss", aux_loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.lr, weight_decay=0.0)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)  # the seed sets the data order too
        tokens = TokenSet(self.train_data)
        batches = BatchSampler(RandomSampler(tokens, generator=generator), self.batch_size, drop_last=True)
        return DataLoader(tokens, sampler=batches, batch_size=None)


class TokenSet(Dataset):
    """Tokens held as tensors; indexed by a list of indices it returns that batch (one gather per tensor)."""

    def __init__(self, data: dict[str, Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["y"])

    def __getitem__(self, indices: list[int]) -> dict[str, Tensor]:
        index = torch.as_tensor(indices)
        return {name: values.index_select(0, index) for name, values in self.data.items()}


def task_loss(outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """(B,) per token: cross-entropy on the label, or for a regression target ("flip") squared error."""
    if "target" in batch:
        return (outputs - batch["target"]).square().mean(-1)
    return F.cross_entropy(outputs, batch["y"], reduction="none")


@torch.no_grad()
def evaluate(model: PlantedModel, data: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per token: correct (B,) bool and loss (B,); with an MoE, the experts each token went to (B, k)."""
    model.eval()
    logits = model(data["x"], data["family"])  # (B, C)
    result = {"correct": logits.argmax(-1) == data["y"], "loss": task_loss(logits, data)}
    if isinstance(model.mlp, SparseMoE):
        result["experts"] = model.mlp.last_routing.topk_index
    model.train()
    return result
