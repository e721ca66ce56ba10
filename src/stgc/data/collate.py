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


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its eos id when it has none (padding is masked out everywhere)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prompt_batch(prompts: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts (B, P) and their attention mask, as generation takes them."""
    return {
        "prompt_input_ids": pad(prompts, pad_id, left=True),
        "prompt_attention_mask": pad([torch.ones_like(p) for p in prompts], 0, left=True),
    }


def answer_spans(targets: torch.Tensor) -> list[torch.Tensor]:
    """The runs of trained positions in one row of next-token targets (labels[row, 1:], (L-1,)): one
    per answer (its tokens and end token), in order; position p's hidden state predicts target p."""
    positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (T,) trained positions
    breaks = (positions[1:] - positions[:-1] != 1).nonzero().squeeze(1) + 1
    return list(positions.tensor_split(breaks.tolist()))


def is_empty(batch: dict[str, Any]) -> bool:
    """Whether every sample of the batch was a skipped bad record."""
    return "input_ids" not in batch


def stack_images(images: list[torch.Tensor | dict[str, torch.Tensor] | None]) -> torch.Tensor | list:
    """The batch's images: (B, 3, H, W); a processor model's stay a list of each row's pixel inputs
    (None without an image), which the model concatenates (stgc.data.processor.concat_pixel_inputs),
    so that evaluation can take the rows it generates for."""
    if all(isinstance(image, torch.Tensor) for image in images):
        return torch.stack(images).float()
    return images


class LlavaCollator:
    """Collate dataset items into a batch dict; drops "skipped" items (bad records in skip mode)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Batch of the kept items; "keys" are their records' (id, occurrence) keys, "indices" their
        positions in the dataset; "skipped" lists the (record key, reason) of the dropped ones, and a
        batch whose every item was dropped holds only that (see is_empty)."""
        kept = [item for item in items if "skipped" not in item]
        skipped = [item["skipped"] for item in items if item.get("skipped") is not None]  # not padding
        if not kept:
            return {"skipped": skipped}
        ids = [item["input_ids"] for item in kept]
        batch = {
            "keys": [item["key"] for item in kept],
            "indices": [item["index"] for item in kept],
            "images": stack_images([item["image"] for item in kept]),
            "input_ids": pad(ids, self.pad_token_id),  # (B, L)
            "attention_mask": pad([torch.ones_like(i) for i in ids], 0),  # (B, L)
            "labels": pad([item["labels"] for item in kept], IGNORE_INDEX),  # (B, L)
            "skipped": skipped,
        }
        if "prompt_ids" in kept[0]:
            batch.update(prompt_batch([item["prompt_ids"] for item in kept], self.pad_token_id))
            batch["turns"] = [item["turn"] for item in kept]
            batch["questions"] = [item["question"] for item in kept]
            batch["answers"] = [item["answer"] for item in kept]
            batch["question_types"] = [item["question_type"] for item in kept]
        elif "answers" in kept[0]:  # per sample: its answers' texts and types, in order
            batch["answers"] = [item["answers"] for item in kept]
            batch["question_types"] = [item["question_types"] for item in kept]
        return batch
