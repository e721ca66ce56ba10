"""The conflict elimination loss (CEL): lower conflicting tokens' routing scores for their experts.

Three forms, for router logits z_t (E,) of token t, p_t = softmax(z_t), and conflicting (t, e) pairs.
What one descent step does to p_{t,e} is checked by tests/test_conflict_loss.py and printed on random
logits by scripts/cel_directions.py:

- `negated_logits`: CE(softmax(z_t), stopgrad softmax(-z_t)), averaged over the conflicting tokens:
  the reviewers' reading of the paper's Eq. 8 (target z' = -z). Its gradient p_t - softmax(-z_t) is the
  same whichever expert conflicted and pushes hardest on the token's first choice, so when the
  conflicting expert is the second choice a step can raise its p_{t,e}.
- `negated_logits_per_expert`: -log softmax(-z_t)_e per conflicting pair, summed and divided by
  E·max(1, N) for N routed tokens (a published re-implementation: Li et al., "Routing in Gradient
  Space", App. D.10). Its gradient on z_{t,e} is 1 - softmax(-z_t)_e > 0 and on every other logit
  -softmax(-z_t)_j < 0, so a step always lowers p_{t,e}.
- `unlikelihood`: -log(1 - p_{t,e}), averaged over the conflicting pairs; its gradient is
  p_{t,e}/(1 - p_{t,e}) · (onehot_e - p_t) scaled, i.e. it lowers z_{t,e} against all others: always
  lowers p_{t,e}.

Sigmoid routers (DeepSeek-V3, GLM-4.5V, Llama 4: stgc.method.routers) score each expert on its own,
s_{t,e} = σ(z_{t,e}), so each form is written for that score (`scores="sigmoid"`):
- `negated_logits`: Σ_j BCE(σ(z_j), stopgrad σ(-z_j)) per conflicting token, averaged: the Bernoulli
  twin of the softmax form. Its gradient σ(z_j) - σ(-z_j) pulls every logit toward 0: it lowers the
  scores above 1/2 (as a chosen expert's usually is) and raises those below, whichever conflicted.
- `negated_logits_per_expert`: -log σ(-z_{t,e}) per pair, summed and divided by E·max(1, N);
- `unlikelihood`: -log(1 - σ(z_{t,e})), averaged over the pairs.
The last two are softplus(z_{t,e}): gradient σ(z_{t,e}) > 0 on the conflicting expert's logit alone,
so a step lowers its score and leaves the token's other experts' scores where they were.
"""

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("negated_logits", "negated_logits_per_expert", "unlikelihood")


class LossForm(Protocol):
    """A CEL form of one's own, passed as `loss_type=`: the loss of one layer, differentiable in the logits."""

    def __call__(self, router_logits: Tensor, rows: Tensor, experts: Tensor, flagged: Tensor) -> Tensor:
        """router_logits (N, E) float32 with grad; rows, experts, flagged (P,): the layer's (token,
        expert) assignments and those the CEL applies to. A 0-d loss; 0 when nothing is flagged."""


def conflict_elimination_loss(
    router_logits: Tensor,
    rows: Tensor,
    experts: Tensor,
    loss_type: "str | LossForm" = "negated_logits",
    flagged: Tensor | None = None,
    scores: str = "softmax",
) -> Tensor:
    """The CEL over the conflicting (token, expert) pairs: `rows` (into router_logits) and `experts`,
    those of them `flagged` (all when None); 0 when none is. Masks, not boolean indexing: no host sync.

    router_logits: (N, E) float32 with grad; rows, experts, flagged: (P,); scores: the router's score
    family, "softmax" or "sigmoid" (stgc.method.routers.RouterRule.scores). Forms: see the module.
    """
    if callable(loss_type):
        return loss_type(
            router_logits,
            rows,
            experts,
            torch.ones_like(rows, dtype=torch.bool) if flagged is None else flagged,
        )
    dtype = router_logits.dtype
    weights = torch.ones_like(rows, dtype=dtype) if flagged is None else flagged.to(dtype)  # (P,)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
    if loss_type == "negated_logits":
        per_token = torch.zeros(router_logits.shape[0], dtype=weights.dtype, device=weights.device)
        token_flagged = (per_token.index_add_(0, rows, weights) > 0).to(weights.dtype)  # (N,) once per token
        if scores == "sigmoid":
            target = torch.sigmoid(-router_logits.detach())  # (N, E)
            per_expert = F.binary_cross_entropy_with_logits(router_logits, target, reduction="none")
            cross_entropy = per_expert.sum(dim=-1)  # (N,)
        else:
            target = torch.softmax(-router_logits.detach(), dim=-1)  # (N, E)
            cross_entropy = -(target * torch.log_softmax(router_logits, dim=-1)).sum(dim=-1)  # (N,)
        return (cross_entropy * token_flagged).sum() / token_flagged.sum().clamp(min=1)
    logits = router_logits.index_select(0, rows)  # (P, E)
    if scores == "sigmoid":  # both forms are softplus(z_{t,e}) = -log σ(-z_{t,e}) = -log(1 - σ(z_{t,e}))
        softplus = F.softplus(logits.gather(1, experts[:, None])[:, 0])  # (P,)
        if loss_type == "negated_logits_per_expert":
            num_tokens, num_experts = router_logits.shape
            return (softplus * weights).sum() / (num_experts * max(1, num_tokens))
        return (softplus * weights).sum() / weights.sum().clamp(min=1)
    if loss_type == "negated_logits_per_expert":
        log_q = torch.log_softmax(-logits, dim=-1).gather(1, experts[:, None])[:, 0]  # (P,) log softmax(-z)_e
        num_tokens, num_experts = router_logits.shape
        return -(log_q * weights).sum() / (num_experts * max(1, num_tokens))
    others = logits.scatter(1, experts[:, None], float("-inf"))  # (P, E) with z_e masked out
    log_one_minus_p = torch.logsumexp(others, dim=-1) - torch.logsumexp(logits, dim=-1)  # log(1 - p_e)
    return -(log_one_minus_p * weights).sum() / weights.sum().clamp(min=1)
