"""The conflict elimination loss (CEL): lower conflicting tokens' routing scores for their experts."""

import torch
from torch import Tensor

LOSS_TYPES = ("negated_logits", "unlikelihood")


def conflict_elimination_loss(
    router_logits: Tensor, rows: Tensor, experts: Tensor, loss_type: str = "negated_logits"
) -> Tensor:
    """Mean CEL over conflicting (token, expert) pairs given by `rows` (into router_logits) and `experts`.

    negated_logits (the paper's form): CE(softmax(z_t), stopgrad softmax(-z_t)), averaged over the
    conflicting tokens. unlikelihood: -log(1 - p_{t,e}), averaged over the conflicting pairs.
    router_logits: (N, E) float32 with grad.
    """
    if loss_type == "negated_logits":
        logits = router_logits.index_select(0, torch.unique(rows))  # (T_c, E)
        target = torch.softmax(-logits.detach(), dim=-1)  # (T_c, E)
        return -(target * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
    if loss_type == "unlikelihood":
        logits = router_logits.index_select(0, rows)  # (P_c, E)
        others = logits.scatter(1, experts[:, None], float("-inf"))  # (P_c, E) with z_e masked out
        log_one_minus_p = torch.logsumexp(others, dim=-1) - torch.logsumexp(logits, dim=-1)  # log(1 - p_e)
        return -log_one_minus_p.mean()
    raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
