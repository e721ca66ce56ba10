"""The conflict elimination loss (CEL): lower conflicting tokens' routing scores for their experts."""

import torch
from torch import Tensor

LOSS_TYPES = ("negated_logits", "unlikelihood")


def conflict_elimination_loss(
    router_logits: Tensor,
    rows: Tensor,
    experts: Tensor,
    loss_type: str = "negated_logits",
    flagged: Tensor | None = None,
) -> Tensor:
    """Mean CEL over the conflicting (token, expert) pairs: `rows` (into router_logits) and `experts`,
    those of them `flagged` (all when None); 0 when none is. Masks, not boolean indexing: no host sync.

    negated_logits (the paper's form): CE(softmax(z_t), stopgrad softmax(-z_t)), averaged over the
    conflicting tokens. unlikelihood: -log(1 - p_{t,e}), averaged over the conflicting pairs.
    router_logits: (N, E) float32 with grad; rows, experts, flagged: (P,).
    """
    dtype = router_logits.dtype
    weights = torch.ones_like(rows, dtype=dtype) if flagged is None else flagged.to(dtype)  # (P,)
    if loss_type == "negated_logits":
        per_token = torch.zeros(router_logits.shape[0], dtype=weights.dtype, device=weights.device)
        token_flagged = (per_token.index_add_(0, rows, weights) > 0).to(weights.dtype)  # (N,) once per token
        target = torch.softmax(-router_logits.detach(), dim=-1)  # (N, E)
        cross_entropy = -(target * torch.log_softmax(router_logits, dim=-1)).sum(dim=-1)  # (N,)
        return (cross_entropy * token_flagged).sum() / token_flagged.sum().clamp(min=1)
    if loss_type == "unlikelihood":
        logits = router_logits.index_select(0, rows)  # (P, E)
        others = logits.scatter(1, experts[:, None], float("-inf"))  # (P, E) with z_e masked out
        log_one_minus_p = torch.logsumexp(others, dim=-1) - torch.logsumexp(logits, dim=-1)  # log(1 - p_e)
        return -(log_one_minus_p * weights).sum() / weights.sum().clamp(min=1)
    raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
