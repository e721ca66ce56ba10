"""What one descent step of each CEL form does to the conflicting expert, on random router logits.

    python scripts/cel_directions.py [--tokens 200000] [--experts 4] [--top-k 2]

For each form, router confidence (logits' standard deviation) and which of the token's top-k the
conflicting expert is, it prints the share of tokens whose p_{t,e} rises after one SGD step on the
logits, the share whose z_{t,e} rises, and the mean gradient on z_{t,e} (positive: lowered), per
token under each form's own normalisation (negated_logits_per_expert's includes its 1/E).
"""

import argparse

import torch

from stgc.method.loss import LOSS_TYPES, conflict_elimination_loss


def directions(logits: torch.Tensor, expert: torch.Tensor, loss_type: str, lr: float) -> dict[str, float]:
    """Shares of tokens (one flagged pair each) whose p_{t,e} and z_{t,e} rise after one step."""
    logits = logits.clone().requires_grad_()
    rows = torch.arange(logits.shape[0])
    loss = conflict_elimination_loss(logits, rows, expert, loss_type)
    (grad,) = torch.autograd.grad(loss * logits.shape[0], logits)  # per-token gradients, whatever the mean
    after = logits.detach() - lr * grad
    p_before = logits.detach().softmax(-1)[rows, expert]
    p_after = after.softmax(-1)[rows, expert]
    grad_e = grad[rows, expert]
    return {
        "p_rises": float((p_after > p_before).float().mean()),
        "z_rises": float((grad_e < 0).float().mean()),
        "grad_on_z_e": float(grad_e.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    print(f"{'form':27s} {'std':>4s} {'choice':>6s} {'p_e rises':>9s} {'z_e rises':>9s} {'grad z_e':>8s}")
    for loss_type in LOSS_TYPES:
        for std in (0.1, 0.5, 1.0, 2.0):
            logits = torch.randn(args.tokens, args.experts, generator=generator) * std
            top = logits.topk(args.top_k, dim=-1).indices
            for choice in range(args.top_k):
                result = directions(logits, top[:, choice], loss_type, args.lr)
                print(
                    f"{loss_type:27s} {std:4.1f} {choice + 1:6d} {result['p_rises']:9.3f} "
                    f"{result['z_rises']:9.3f} {result['grad_on_z_e']:8.3f}"
                )


if __name__ == "__main__":
    main()
