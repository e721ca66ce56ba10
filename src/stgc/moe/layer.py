"""Sparse mixture-of-experts layer (top-k router over copies of a dense MLP) and its routing record.

Notation: B batch, T sequence, H hidden, E experts, k experts per token, N routed tokens
(all B*T tokens, or those the token mask keeps), S = N*k routing slots (assignments).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stgc.constants import MODALITIES
from stgc.moe.experts import fused_experts, grouped, stack_expert_state
from stgc.moe.grouped import Groups
from stgc.moe.recompute import replaying
from stgc.precision import autocast_off, to_compute_dtype


@dataclass
class RoutingRecord:
    """What one SparseMoE forward routed where; references to live tensors, no activation copies.

    router_input:  (N, H) the tensor fed to the router (routed tokens, flattened, after jitter);
                   router_logits == router_input.float() @ router.weight.float().T
    token_index:   (N,) position of each routed token in the flattened B*T input
    router_logits: (N, E) float32, with grad
    topk_index:    (N, k) chosen experts, best first
    topk_weight:   (N, k) float32 softmax probabilities of the chosen experts renormalised to sum to 1
    expert_rows:   E tensors; expert_rows[e] holds the rows (into the N routed tokens) that expert e
                   processed, in the order of the expert's input rows; capacity drops excluded
    sorted_rows:   (S_kept,) expert_rows laid end to end: the row of each of the experts' input rows
    groups:        where each expert's rows are among the experts' S_kept input rows (sorted by expert)
    modality:      (N,) per routed token (0 text, 1 image), or None
    num_dropped:   assignments dropped by the capacity limit (0 when dropless)
    aux_loss:      load-balancing loss E * sum_i f_i * P_i (1.0 at uniform routing), with grad
    z_loss:        router z-loss mean(logsumexp(logits)^2), with grad
    """

    router_input: Tensor
    token_index: Tensor
    router_logits: Tensor
    topk_index: Tensor
    topk_weight: Tensor
    expert_rows: list[Tensor]
    sorted_rows: Tensor
    groups: Groups
    modality: Tensor | None
    num_dropped: int
    aux_loss: Tensor
    z_loss: Tensor


ROUTING_CONTEXT = ("token_mask", "token_index", "modality", "routed_modality")  # set by routing_context


class SparseMoE(nn.Module):
    """Top-k routed experts that start as exact copies of a dense MLP (sparse upcycling). The experts are
    the MLP with fused weights (stgc.moe.experts): one forward over all experts' rows, sorted by expert.

    Capacity rule (when capacity_factor is set): each expert keeps at most
    ceil(capacity_factor * N * k / E) assignments; assignments are ranked by token order (then by
    the token's top-k rank) and the first ones are kept. A dropped assignment contributes nothing:
    the token's output is the weighted sum of its kept experts only (weights are not renormalised).
    """

    def __init__(
        self,
        mlp: nn.Module,
        hidden_size: int,
        num_experts: int = 4,
        top_k: int = 2,
        capacity_factor: float | None = None,
        router_jitter: float = 0.0,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts ({num_experts}) must be >= 1.")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k ({top_k}) must be in [1, num_experts={num_experts}].")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor ({capacity_factor}) must be > 0 or None (dropless).")
        if not 0.0 <= router_jitter < 1.0:
            raise ValueError(f"router_jitter ({router_jitter}) must be in [0, 1).")
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.router_jitter = router_jitter
        param = next(mlp.parameters())
        self.router = nn.Linear(hidden_size, num_experts, bias=False, device=param.device, dtype=param.dtype)
        self.experts = fused_experts(mlp, num_experts)
        self._register_load_state_dict_pre_hook(self._fuse_per_expert_state)
        # set by routing_context for one forward: which tokens to route, and their modality
        self.token_mask: Tensor | None = None  # (B, T) bool
        self.token_index: Tensor | None = None  # (N,) flat positions of the token mask's tokens
        self.modality: Tensor | None = None  # (B, T) long
        self.routed_modality: Tensor | None = None  # (N,) modality of each routed token
        self.last_routing: RoutingRecord | None = None

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, "
            f"capacity_factor={self.capacity_factor}, router_jitter={self.router_jitter}"
        )

    def forward(self, x: Tensor) -> Tensor:
        """Route each (unmasked) token to its top-k experts; masked tokens output zeros."""
        with replaying(self, ROUTING_CONTEXT):  # a recomputation in backward runs after routing_context
            return self._route(x)

    def _route(self, x: Tensor) -> Tensor:
        x_flat = x.reshape(-1, x.shape[-1])  # (B*T, H)
        token_index = self._routed_positions(x)  # (N,)
        x_routed = x_flat if self.token_mask is None else x_flat.index_select(0, token_index)  # (N, H)
        router_input = x_routed
        if self.training and self.router_jitter > 0:
            noise = torch.empty_like(x_routed).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
            router_input = x_routed * noise  # (N, H)
        with autocast_off(x):  # routing in fp32 under any autocast: the logits STGC differentiates
            logits = F.linear(router_input.float(), self.router.weight.float())  # (N, E) float32
            probs = logits.softmax(dim=-1)  # (N, E)
            topk_weight, topk_index = probs.topk(self.top_k, dim=-1)  # (N, k), (N, k)
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)  # (N, k), rows sum to 1

        flat_expert = topk_index.reshape(-1)  # (S,) token-major: slot s is token s // k
        counts = expert_counts(flat_expert, self.num_experts)  # (E,)
        order = torch.argsort(flat_expert, stable=True)  # (S,) slots grouped by expert, token order kept
        capacity = self._capacity(x_routed.shape[0])
        kept_counts = counts if capacity is None else counts.clamp(max=capacity)  # (E,)
        sizes = kept_counts.tolist()  # the layer's one host sync: the experts' split sizes
        if capacity is not None:
            order = self._within_capacity(order, counts, capacity, sum(sizes))  # (S_kept,)
        num_dropped = flat_expert.numel() - order.numel()

        rows = order // self.top_k  # (S_kept,) routed-token row of each kept slot
        weights = topk_weight.reshape(-1).index_select(0, order).to(x.dtype)  # (S_kept,)
        row_experts = flat_expert.index_select(0, order)  # (S_kept,)
        groups = Groups(sizes, kept_counts.cumsum(0, dtype=torch.int32), row_experts)
        # (S_kept, H) sorted by expert, in the dtype the experts compute in: the tensor autograd keeps
        expert_in = to_compute_dtype(x_routed.index_select(0, rows))
        with grouped(self.experts, groups):
            expert_out = self.experts(expert_in)  # (S_kept, H)
        out_routed = torch.zeros_like(x_routed).index_add_(0, rows, expert_out * weights[:, None])  # (N, H)
        out = out_routed
        if self.token_mask is not None:
            out = torch.zeros_like(x_flat).index_copy_(0, token_index, out_routed)  # (B*T, H)

        aux_loss, z_loss = self._losses(logits, probs, counts)
        self.last_routing = RoutingRecord(
            router_input=router_input,
            token_index=token_index,
            router_logits=logits,
            topk_index=topk_index,
            topk_weight=topk_weight,
            expert_rows=list(rows.split(sizes)),
            sorted_rows=rows,
            groups=groups,
            modality=self._routed_modality(x),
            num_dropped=num_dropped,
            aux_loss=aux_loss,
            z_loss=z_loss,
        )
        return out.view_as(x)  # (B, T, H)

    def _fuse_per_expert_state(self, state_dict: dict, prefix: str, *args) -> None:
        """Load a checkpoint saved with one module per expert (experts.<e>.<name>) into the fused experts."""
        stack_expert_state(state_dict, prefix, self.num_experts)

    def _routed_positions(self, x: Tensor) -> Tensor:
        """Flat positions of the tokens to route: all of them, or those the routing context keeps."""
        if self.token_mask is None:
            return torch.arange(x.shape[:-1].numel(), device=x.device)  # (B*T,)
        if self.token_mask.shape != x.shape[:-1]:
            raise ValueError(
                f"token_mask shape {tuple(self.token_mask.shape)} does not match hidden states "
                f"{tuple(x.shape)} (expected {tuple(x.shape[:-1])})."
            )
        return self.token_index  # (N,) found once per forward by routing_context

    def _routed_modality(self, x: Tensor) -> Tensor | None:
        """Modality of each routed token, or None outside a routing context."""
        if self.modality is None:
            return None
        if self.modality.shape != x.shape[:-1]:
            raise ValueError(
                f"modality shape {tuple(self.modality.shape)} does not match hidden states "
                f"{tuple(x.shape)} (expected {tuple(x.shape[:-1])})."
            )
        if self.routed_modality is None:  # a modality without a token mask: every token is routed
            return self.modality.reshape(-1)  # (N,)
        return self.routed_modality  # (N,)

    def _capacity(self, num_tokens: int) -> int | None:
        """Assignments each expert may keep, or None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def _within_capacity(self, order: Tensor, counts: Tensor, capacity: int, num_kept: int) -> Tensor:
        """The slots of `order` (grouped by expert) that are among their expert's first `capacity`."""
        starts = torch.cumsum(counts, dim=0) - counts  # (E,) first sorted position of each expert
        experts = torch.arange(self.num_experts, device=counts.device)  # (E,)
        sorted_expert = torch.repeat_interleave(experts, counts, output_size=order.numel())  # (S,)
        rank = torch.arange(order.numel(), device=order.device) - starts[sorted_expert]  # (S,) rank in expert
        kept_first = torch.argsort((rank >= capacity).to(torch.uint8), stable=True)  # (S,) kept, in order
        return order.index_select(0, kept_first[:num_kept])  # (S_kept,) no boolean mask: no host sync

    def _losses(self, logits: Tensor, probs: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        """Load-balancing loss E * sum_i f_i P_i and router z-loss, over routed tokens (0 if none)."""
        num_tokens = max(logits.shape[0], 1)
        f = counts.float() / (num_tokens * self.top_k)  # (E,) fraction of slots per expert
        p = probs.sum(dim=0) / num_tokens  # (E,) mean router probability
        aux_loss = self.num_experts * (f * p).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().sum() / num_tokens
        return aux_loss, z_loss


def expert_counts(expert_index: Tensor, num_experts: int, weights: Tensor | None = None) -> Tensor:
    """(E,) number (or summed `weights`) of the entries of `expert_index` on each expert; unlike
    bincount it needs no host sync to size its output."""
    values = torch.ones_like(expert_index) if weights is None else weights
    return torch.zeros(num_experts, dtype=values.dtype, device=expert_index.device).index_add_(
        0, expert_index.reshape(-1), values.reshape(-1)
    )


def routing_stats(record: RoutingRecord) -> dict[str, float]:
    """Per-expert load, mean router entropy, drop rate, and load per modality, for logging."""
    num_experts = record.router_logits.shape[-1]
    stats = {f"load/expert_{e}": v for e, v in enumerate(_load(record.topk_index, num_experts).tolist())}
    log_probs = record.router_logits.detach().log_softmax(dim=-1)  # (N, E)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)  # (N,)
    stats["entropy"] = entropy.mean().item() if entropy.numel() else 0.0
    stats["dropped_fraction"] = record.num_dropped / max(record.topk_index.numel(), 1)
    if record.modality is not None:
        for name, value in MODALITIES.items():
            selected = (record.modality == value)[:, None].expand_as(record.topk_index)  # (N, k)
            load = _load(record.topk_index, num_experts, selected).tolist()
            stats.update({f"load_{name}/expert_{e}": v for e, v in enumerate(load)})
    return stats


def _load(topk_index: Tensor, num_experts: int, selected: Tensor | None = None) -> Tensor:
    """Fraction of the (selected) routing slots on each expert (zeros when there are none)."""
    weights = torch.ones_like(topk_index, dtype=torch.float) if selected is None else selected.float()
    counts = expert_counts(topk_index, num_experts, weights)  # (E,)
    return counts / counts.sum().clamp(min=1)
