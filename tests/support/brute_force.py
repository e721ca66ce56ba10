"""Per-token gradients of one expert, materialised with torch.func: the independent reference that
STGC's exact cosines are checked against."""

import torch
from torch.func import grad, vmap


def token_gradients(
    expert_fn, expert_params, inputs, output_grads, topk_index, topk_weight, expert, gradient="exact"
):
    """Rows (n_e,) of the tokens routed to `expert` and their gradients (n_e, P), flattened.

    Token t's exact gradient is ∂/∂θ ⟨w_te · expert(x_t), ∂L/∂y_t⟩, y the MoE layer's output; its
    output gradient is ∂/∂o ⟨w_te · o, ∂L/∂y_t⟩ = w_te · ∂L/∂y_t at the expert's output o."""
    routed = (topk_index == expert).any(dim=-1)  # (N,)
    rows = routed.nonzero().squeeze(1)
    weight = (topk_weight * (topk_index == expert)).sum(dim=-1)  # (N,)
    if gradient == "output":
        return rows, weight[rows, None] * output_grads[rows]  # (n_e, H)
    if rows.numel() == 0:  # no token chose this expert (vmap takes no empty batch)
        return rows, inputs.new_zeros(0, sum(p.numel() for p in expert_params.values()))

    def token_objective(params, x, w, dy):
        return (w * expert_fn(params, x[None])[0] * dy).sum()

    per_token = vmap(grad(token_objective), in_dims=(None, 0, 0, 0))(
        expert_params, inputs[rows], weight[rows], output_grads[rows]
    )
    return rows, torch.cat([g.reshape(len(rows), -1) for g in per_token.values()], dim=1)  # (n_e, P)
