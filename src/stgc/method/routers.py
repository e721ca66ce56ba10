"""How a router turns its logits z (N, E) into the choice of experts and the routing score the CEL lowers.

The MoE families do not share one rule (docs/design.md §4):
- softmax over all E, top-k of it: this project's SparseMoE, Mixtral, Qwen2/3-MoE, Qwen3-VL-MoE, OLMoE;
  Aria chooses on the raw logits and softmaxes the chosen ones, the same ranking and the same
  renormalised weights;
- softmax, chosen with a correction bias added (the bias is not in the weights): ERNIE-4.5(-VL);
- sigmoid per expert, chosen with a correction bias within the best groups of experts (group-limited
  top-k), the unbiased sigmoids as weights: DeepSeek-V3 and the models built on its router (GLM-4.5,
  GLM-4.5V);
- sigmoid of the top-1 logit, which scales the expert's input beside a shared expert: Llama 4.

`RouterRule.scores` names the score family the CEL forms are written for (stgc.method.loss), `choose`
reproduces the router's own top-k (reroute rates are measured with it).
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stgc.method.distributed import full_tensor

SCORES = ("softmax", "sigmoid")


@dataclass(frozen=True, eq=False)
class RouterRule:
    """A router's rule: `scores` "softmax" (over the E logits) or "sigmoid" (per expert); the choice adds
    the (E,) correction bias `bias_owner.<bias_name>` when there is one (read at each call: it is a
    buffer that balancing updates) and keeps the best `topk_groups` of `groups` groups of experts."""

    scores: str = "softmax"
    bias_owner: nn.Module | None = None
    bias_name: str = "e_score_correction_bias"
    groups: int = 1
    topk_groups: int = 1

    def __post_init__(self) -> None:
        if self.scores not in SCORES:
            raise ValueError(f"scores={self.scores!r} must be one of {SCORES}")

    def score(self, logits: Tensor) -> Tensor:
        """(N, E) the routing scores: softmax(z) or sigmoid(z)."""
        return logits.softmax(-1) if self.scores == "softmax" else logits.sigmoid()

    def choose(self, logits: Tensor, top_k: int, scores: Tensor | None = None) -> Tensor:
        """(N, k) the experts the router picks for logits (N, E), under its own rule; `scores`: their
        `score`, when the caller has it."""
        choice = self.score(logits) if scores is None else scores
        if self.bias_owner is not None:
            bias = full_tensor(getattr(self.bias_owner, self.bias_name))  # ERNIE's is a (sharded) parameter
            choice = choice + bias.reshape(-1).to(choice)
        if self.groups > 1:  # DeepSeek-V3: a group's score is the sum of its two best choice scores
            grouped = choice.view(choice.shape[0], self.groups, -1)  # (N, G, E/G)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # (N, G)
            kept = group_scores.topk(self.topk_groups, dim=-1).indices  # (N, topk_groups)
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)  # (N, G)
            choice = choice.masked_fill(~mask.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        return choice.topk(top_k, dim=-1).indices


SOFTMAX = RouterRule()


def router_rule(router: nn.Module) -> RouterRule:
    """The rule of a transformers router module (softmax when it shows no other)."""
    if hasattr(router, "e_score_correction_bias") and hasattr(router, "num_group"):  # DeepSeek-V3's router
        return RouterRule("sigmoid", router, groups=router.num_group, topk_groups=router.topk_group)
    statics = getattr(router, "moe_statics", None)
    if statics is not None and hasattr(statics, "e_score_correction_bias"):  # ERNIE-4.5
        return RouterRule("softmax", statics)
    if type(router).__name__ == "Llama4Router":
        return RouterRule("sigmoid")
    return SOFTMAX
