"""Batching: right-pad sequences for the loss, left-pad prompts for generation."""

from typing import Any

import torch

from stgc.constants import IGNORE_INDEX


def pad(seqs: list[torch.Tensor], value: int, left: bool = False) -> torch.Tensor:
    """Stack 1-D tensors into (B, max_len), padding with `value` on the right (or left)."""
    length = max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), value, dtype=torch.long)  # (B, L)
    for row, s in zip(out, seqs, strict=True):
        (row[length - len(s) :] if left else row[: len(s)]).copy_(s)
    return out


class LlavaCollator:
    """Collate dataset items into a batch dict; drops None items (bad records in skip mode)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        """Batch of the kept items (None if none is left); "num_dropped" counts the dropped ones."""
        kept = [item for item in items if item is not None]
        if not kept:
            return None
        ids = [item["input_ids"] for item in kept]
        batch = {
            "images": torch.stack([item["image"] for item in kept]).float(),  # (B, 3, H, W)
            "input_ids": pad(ids, self.pad_token_id),  # (B, L)
            "attention_mask": pad([torch.ones_like(i) for i in ids], 0),  # (B, L)
            "labels": pad([item["labels"] for item in kept], IGNORE_INDEX),  # (B, L)
            "num_dropped": len(items) - len(kept),
        }
        if "prompt_ids" in kept[0]:
            prompts = [item["prompt_ids"] for item in kept]
            batch["prompt_input_ids"] = pad(prompts, self.pad_token_id, left=True)  # (B, P)
            batch["prompt_attention_mask"] = pad(
                [torch.ones_like(p) for p in prompts], 0, left=True
            )  # (B, P)
            batch["answers"] = [item["answer"] for item in kept]
            batch["question_types"] = [item["question_type"] for item in kept]
        return batch
