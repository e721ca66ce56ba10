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

Training takes these gradients in closed form (`losses_and_logit_grads`, no autograd graph, docs/design.md
§4); `conflict_elimination_loss(es)` is differentiable, its backward the same closed form.
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

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
    per layer (a model's dozens of MoE layers cost one layer's launches). Arguments: one per layer.
    Differentiable in the logits, once: the built-in forms' backward is their closed-form gradient."""
    if flagged is None:
        flagged = [_all_flagged(r) for r in rows]
    if callable(loss_type):  # a form of one's own is one layer's loss
        return torch.stack(
            [loss_type(*layer) for layer in zip(router_logits, rows, experts, flagged, strict=True)]
        )
    return _ClosedFormCEL.apply((rows, experts, loss_type, flagged, scores), *router_logits)


def losses_and_logit_grads(
    router_logits: Sequence[Tensor],
    rows: Sequence[Tensor],
    experts: Sequence[Tensor],
    loss_type: "str | LossForm",
    flagged: Sequence[Tensor],
    scores: str = "softmax",
) -> tuple[Tensor, list[Tensor]]:
    """`conflict_elimination_losses` (detached) and each layer's ∂CEL_l/∂z_l (N_l, E), without an autograd
    graph for the built-in forms: what the router gradients are made of (stgc.method.core). A form of one's
    own is differentiated by autograd."""
    if callable(loss_type):
        leaves = [z.detach().requires_grad_() for z in router_logits]
        with torch.enable_grad():
            losses = conflict_elimination_losses(leaves, rows, experts, loss_type, flagged)
        grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True, materialize_grads=True)
        return losses.detach(), list(grads)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
    pairs = _Pairs.of(router_logits, rows, experts, flagged)
    if loss_type == "negated_logits":
        losses, grad = _per_token(pairs, scores)
    else:
        losses, grad = _per_pair(pairs, loss_type, scores)
    return losses, list(grad.split(pairs.num_tokens))


@dataclass
class _Pairs:
    """All layers' tokens and (token, expert) pairs one after another, for one pass over every layer."""

    logits: Tensor  # (T, E) detached, every layer's tokens
    rows: Tensor  # (P,) each pair's token, into logits
    slots: Tensor  # (P,) each pair's (token, expert) in the flattened (T·E,) logits
    weights: Tensor  # (P,) 1.0 where the pair is flagged, else 0.0
    token_layer: Tensor  # (T,)
    pair_layer: Tensor  # (P,)
    num_tokens: list[int]  # N_l per layer

    @classmethod
    def of(cls, router_logits, rows, experts, flagged) -> "_Pairs":
        logits = torch.cat([z.detach() for z in router_logits])
        num_tokens = [z.shape[0] for z in router_logits]
        starts = [0, *itertools.accumulate(num_tokens[:-1])]
        pair_rows = torch.cat([r if start == 0 else r + start for r, start in zip(rows, starts, strict=True)])
        pair_experts = torch.cat(list(experts))
        layer_ids = torch.arange(len(num_tokens), device=logits.device)
        return cls(
            logits,
            pair_rows,
            pair_rows * logits.shape[1] + pair_experts,
            torch.cat(list(flagged)).to(logits.dtype),
            repeated(layer_ids, num_tokens),
            repeated(layer_ids, [r.shape[0] for r in rows]),
            num_tokens,
        )

    def per_layer(self, values: Tensor, layer: Tensor) -> Tensor:
        """(L,) the sums of each layer's `values`, laid out by `layer` (token_layer or pair_layer)."""
        return expert_counts(layer, len(self.num_tokens), values)

    def per_token(self, values: Tensor) -> Tensor:
        """(T,) the pairs' `values` (P,) added at their token."""
        return torch.zeros_like(self.logits[:, 0]).index_add_(0, self.rows, values)

    def at_pairs(self, values: Tensor) -> Tensor:
        """(T, E) the pairs' `values` (P,) added at their (token, expert)."""
        flat = torch.zeros_like(self.logits).view(-1)
        return flat.index_add_(0, self.slots, values).view_as(self.logits)


def _per_token(pairs: _Pairs, scores: str) -> tuple[Tensor, Tensor]:
    """`negated_logits`: each flagged token's cross-entropy to its flipped distribution, averaged over a
    layer's flagged tokens; its gradient p_t - target (softmax), σ(z_t) - σ(-z_t) (sigmoid)."""
    z = pairs.logits
    token_flagged = (pairs.per_token(pairs.weights) > 0).to(z.dtype)
    if scores == "sigmoid":
        target = torch.sigmoid(-z)  # (T, E)
        per_token = F.binary_cross_entropy_with_logits(z, target, reduction="none").sum(dim=-1)  # (T,)
        slope = torch.sigmoid(z) - target
    else:
        target, log_p = torch.softmax(-z, dim=-1), torch.log_softmax(z, dim=-1)  # (T, E)
        per_token = -(target * log_p).sum(dim=-1)  # (T,)
        slope = log_p.exp() - target
    counted = pairs.per_layer(token_flagged, pairs.token_layer).clamp(min=1)  # (L,) once per token
    losses = pairs.per_layer(per_token * token_flagged, pairs.token_layer) / counted
    return losses, slope * (token_flagged / counted.index_select(0, pairs.token_layer))[:, None]


def _per_pair(pairs: _Pairs, loss_type: str, scores: str) -> tuple[Tensor, Tensor]:
    """`negated_logits_per_expert` and `unlikelihood`: a loss per flagged pair, normalised per layer, and
    its gradient, from (T, E) operators and per-pair scalars (no (P, E) tensor)."""
    z = pairs.logits
    num_experts = z.shape[1]
    pair_logit = z.reshape(-1).index_select(0, pairs.slots)  # (P,) z_{t,e}
    if loss_type == "negated_logits_per_expert":  # over E·max(1, N), N counted on the device: no copy to it
        ones = torch.ones_like(pairs.token_layer, dtype=z.dtype)
        normaliser = num_experts * pairs.per_layer(ones, pairs.token_layer).clamp(min=1)
    else:
        normaliser = pairs.per_layer(pairs.weights, pairs.pair_layer).clamp(min=1)
    coefficient = pairs.weights / normaliser.index_select(0, pairs.pair_layer)  # (P,)
    if scores == "sigmoid":  # both forms are softplus(z_{t,e}) = -log σ(-z_{t,e}) = -log(1 - σ(z_{t,e}))
        per_pair, grad = F.softplus(pair_logit), pairs.at_pairs(coefficient * torch.sigmoid(pair_logit))
    elif loss_type == "negated_logits_per_expert":  # -log softmax(-z)_e; gradient onehot_e - softmax(-z)
        flipped_lse = torch.logsumexp(-z, dim=-1)  # (T,)
        per_pair = pair_logit + flipped_lse.index_select(0, pairs.rows)
        grad = _onehot_minus(pairs.at_pairs(coefficient), torch.softmax(-z, dim=-1))
    else:
        per_pair, grad = _unlikelihood(pairs, pair_logit, coefficient)
    losses = pairs.per_layer(per_pair * pairs.weights, pairs.pair_layer) / normaliser
    return losses, grad


def _unlikelihood(pairs: _Pairs, pair_logit: Tensor, coefficient: Tensor) -> tuple[Tensor, Tensor]:
    """-log(1 - p_{t,e}) per pair (P,) and its weighted gradient (T, E), stable for a near-certain expert.

    The gradient of a pair is r·(onehot_e - p_t) with r = p_e/(1 - p_e), which is p_e·(onehot_e - p_t^{-e})
    (p^{-e}: the softmax over the other experts). Below the token's top expert p_e ≤ 1/2 and the first
    form is exact; at the top one (one per token) the second, from the other experts' sum, not 1 - p."""
    z = pairs.logits
    top_logit = z.amax(dim=-1, keepdim=True)  # (T, 1)
    shifted = z - top_logit  # (T, E) 0 at the top
    at_max = (shifted == 0).to(z.dtype)  # (T, E) float masks: faster than bool ones on a CPU
    has_top = (at_max.sum(dim=-1) == 1).to(z.dtype)  # (T,) one expert above the others (tied: all ≤ 1/2)
    top = at_max * has_top[:, None]  # (T, E) 1 at the top expert
    scaled = shifted.exp()  # (T, E) exp(z - max): 1 at the top expert
    others = scaled - top  # (T, E) without the top expert (exactly 0 there)
    others_sum = others.sum(dim=-1)  # (T,) Σ_{j ≠ top} exp(z_j - max), exact however small
    total = others_sum + has_top  # (T,) Σ_j exp(z_j - max)
    log_p = pair_logit - (top_logit[:, 0] + total.log()).index_select(0, pairs.rows)  # (P,)
    is_top = top.reshape(-1).index_select(0, pairs.slots) > 0  # (P,)
    at_top = (total.log() - others_sum.log()).index_select(0, pairs.rows)  # -log(1 - p) = lse - others' lse
    per_pair = torch.where(is_top, at_top, -torch.log1p(-log_p.exp()))
    weight = coefficient * torch.where(is_top, log_p, log_p + per_pair).exp()  # (P,) c·p_e (top), c·r (below)
    below = pairs.per_token(torch.where(is_top, 0.0, weight))  # (T,) Σ c·r
    above = pairs.per_token(torch.where(is_top, weight, 0.0))  # (T,) c·p_e of the token's top pair
    grad = (
        pairs.at_pairs(weight)
        - scaled * (below / total)[:, None]  # - Σ c·r · p_t
        - others * (above / others_sum.clamp(min=torch.finfo(z.dtype).tiny))[:, None]  # - c·p_e · p_t^{-top}
    )
    return per_pair, grad


def _onehot_minus(weights: Tensor, probabilities: Tensor) -> Tensor:
    """(T, E) Σ_pairs w·(onehot_e - probabilities_t) from the pairs' weights at (token, expert) (T, E)."""
    return weights - weights.sum(dim=-1, keepdim=True) * probabilities


class _ClosedFormCEL(torch.autograd.Function):
    """The built-in forms' losses (L,), whose backward is their closed-form logit gradients."""

    @staticmethod
    def forward(ctx, arguments: tuple, *router_logits: Tensor) -> Tensor:
        rows, experts, loss_type, flagged, scores = arguments
        losses, grads = losses_and_logit_grads(router_logits, rows, experts, loss_type, flagged, scores)
        ctx.save_for_backward(*grads)
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses: Tensor) -> tuple:
        return None, *(grad * weight for grad, weight in zip(ctx.saved_tensors, grad_losses, strict=True))


def _all_flagged(rows: Tensor) -> Tensor:
    return torch.ones_like(rows, dtype=torch.bool)
