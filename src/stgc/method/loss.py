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

import itertools
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from stgc.method.flat import repeated
from stgc.moe.layer import expert_counts

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
        return loss_type(router_logits, rows, experts, _all_flagged(rows) if flagged is None else flagged)
    flags = None if flagged is None else [flagged]
    return conflict_elimination_losses([router_logits], [rows], [experts], loss_type, flags, scores)[0]


def conflict_elimination_losses(
    router_logits: Sequence[Tensor],
    rows: Sequence[Tensor],
    experts: Sequence[Tensor],
    loss_type: "str | LossForm" = "negated_logits",
    flagged: Sequence[Tensor] | None = None,
    scores: str = "softmax",
) -> Tensor:
    """(L,) the CEL of each of L layers that have the same number of experts and score family, each as
    `conflict_elimination_loss` gives it, in one pass over all their pairs: the operators do not repeat
    per layer (a model's dozens of MoE layers cost one layer's launches). Arguments: one per layer."""
    if flagged is None:
        flagged = [_all_flagged(r) for r in rows]
    if callable(loss_type):  # a form of one's own is one layer's loss
        return torch.stack(
            [loss_type(*layer) for layer in zip(router_logits, rows, experts, flagged, strict=True)]
        )
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
    logits = torch.cat(list(router_logits))  # (ΣN, E) the layers' tokens one after another
    num_tokens = [z.shape[0] for z in router_logits]
    starts = [0, *itertools.accumulate(num_tokens[:-1])]
    pair_rows = torch.cat(
        [r if start == 0 else r + start for r, start in zip(rows, starts, strict=True)]
    )  # (P,)
    weights = torch.cat(list(flagged)).to(logits.dtype)  # (P,)
    layer_ids = torch.arange(len(num_tokens), device=logits.device)
    pair_layer = repeated(layer_ids, [r.shape[0] for r in rows])  # (P,)
    token_layer = repeated(layer_ids, num_tokens)  # (ΣN,)

    def per_layer(values: Tensor, layer: Tensor) -> Tensor:  # (L,) sums of a layer's values
        return expert_counts(layer, len(num_tokens), values)

    if loss_type == "negated_logits":
        token_flagged = (torch.zeros_like(logits[:, 0]).index_add_(0, pair_rows, weights) > 0).to(
            logits.dtype
        )
        if scores == "sigmoid":
            target = torch.sigmoid(-logits.detach())  # (ΣN, E)
            per_expert = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            cross_entropy = per_expert.sum(dim=-1)  # (ΣN,)
        else:
            target = torch.softmax(-logits.detach(), dim=-1)  # (ΣN, E)
            cross_entropy = -(target * torch.log_softmax(logits, dim=-1)).sum(dim=-1)  # (ΣN,)
        counted = per_layer(token_flagged, token_layer).clamp(min=1)  # once per token
        return per_layer(cross_entropy * token_flagged, token_layer) / counted
    pair_logits = logits.index_select(0, pair_rows)  # (P, E)
    chosen = torch.cat(list(experts))[:, None]  # (P, 1)
    if scores == "sigmoid":  # both forms are softplus(z_{t,e}) = -log σ(-z_{t,e}) = -log(1 - σ(z_{t,e}))
        per_pair = F.softplus(pair_logits.gather(1, chosen)[:, 0])  # (P,)
    elif loss_type == "negated_logits_per_expert":
        per_pair = -torch.log_softmax(-pair_logits, dim=-1).gather(1, chosen)[:, 0]  # (P,) -log softmax(-z)_e
    else:
        others = pair_logits.scatter(1, chosen, float("-inf"))  # (P, E) with z_e masked out
        per_pair = torch.logsumexp(pair_logits, dim=-1) - torch.logsumexp(others, dim=-1)  # -log(1 - p_e)
    total = per_layer(per_pair * weights, pair_layer)
    if loss_type == "negated_logits_per_expert":  # over E·max(1, N), N counted on the device: no copy to it
        return total / (
            logits.shape[1]
            * per_layer(torch.ones_like(token_layer, dtype=logits.dtype), token_layer).clamp(min=1)
        )
    return total / per_layer(weights, pair_layer).clamp(min=1)


def _all_flagged(rows: Tensor) -> Tensor:
    return torch.ones_like(rows, dtype=torch.bool)
