"""VQA evaluation shared by this project's LightningModules (LVLMModule, stgc.vlm.TransformersVLMModule):
the val/test loss, greedy answers scored per question type, predict's answer rows, and the optimizer.

A module that mixes it in gives `forward(batch)` (an output with `.loss` and `.logits`), `answer(batch)`
(greedy answers to left-padded prompts), `_generate_from(prompts, images)`, a `tokenizer`, and hparams
`max_new_tokens`, `lr`, `weight_decay`, `warmup_ratio`; `batch["images"][row]` is whatever the module's
generation takes for that row's image.
"""

import warnings
from typing import Any

import torch
from torchmetrics import MeanMetric

from stgc.constants import IGNORE_INDEX
from stgc.data.collate import answer_spans, is_empty
from stgc.model.metrics import VQAAccuracy
from stgc.optim import adamw_warmup_cosine

# Teacher-forced and KV-cached greedy decoding round differently: an argmax that wins by less than
# one unit in the last place of a logit near 10 (bf16: 2^-4, fp16: 2^-7) is left to generation.
ARGMAX_MARGIN = {torch.float32: 1e-4, torch.float16: 0.0078, torch.bfloat16: 0.0625, torch.float64: 0.0}


class VQAEvaluation:
    """The evaluation half of a VQA LightningModule (mixed in before LightningModule)."""

    def setup(self, stage: str) -> None:
        """VQA accuracy per question type of the trainer's DataModule (its `question_types`; without
        them every answer counts under "other")."""
        question_types = getattr(self.trainer.datamodule, "question_types", ())
        self.val_vqa = VQAAccuracy(question_types)
        self.test_vqa = VQAAccuracy(question_types)

    def _evaluate(self, batch: dict[str, Any], loss_metric: MeanMetric, vqa_metric: VQAAccuracy) -> None:
        if is_empty(batch):
            return
        output = self(batch)
        num_targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        loss_metric.update(output.loss, weight=num_targets)
        if "answers" in batch:
            answers = [a for sample in batch["answers"] for a in sample]
            types = [t for sample in batch["question_types"] for t in sample]
            vqa_metric.update(self.score_answers(batch, output.logits), answers, types)

    @torch.no_grad()
    def score_answers(self, batch: dict[str, Any], logits: torch.Tensor) -> list[str]:
        """What greedy generation answers to every question of the batch's conversations, given the
        true earlier turns, in order — from the teacher-forced logits where they suffice.

        Greedy decoding reproduces an answer exactly when the teacher-forced argmax at each of its
        tokens and at its end token is that token (each next step then sees the same context), wins
        by more than the logits' rounding (ARGMAX_MARGIN), and they fit in max_new_tokens, so those
        answers need no generation. Only the others are
        generated, from their prompts (the conversation up to the answer), as predict does: the
        text is the same either way, at the cost of one forward per conversation, not one
        forward and one generation per answer.
        """
        # on the CPU once: the per-answer checks below then cost no device synchronisation
        top2 = logits[:, :-1].float().topk(2, dim=-1)  # (B, L-1, 2): the greedy next token and runner-up
        predicted = top2.indices[..., 0].cpu()  # (B, L-1)
        # where the two are closer than the logits' rounding, a KV-cached generation may pick the other
        clear = (top2.values[..., 0] - top2.values[..., 1] > ARGMAX_MARGIN[logits.dtype]).cpu()  # (B, L-1)
        targets = batch["labels"][:, 1:].cpu()  # (B, L-1)
        reproduced, prompts, images = [], [], []  # token ids, or the prompt to generate from
        for row, sample_answers in enumerate(batch["answers"]):
            spans = answer_spans(targets[row])  # a run per answer: its tokens and eos
            for span in spans[: len(sample_answers)]:  # a run past them is an answer cut by max_length
                fits = len(span) <= self.hparams.max_new_tokens  # generation would reach its eos
                if fits and torch.equal(predicted[row, span], targets[row, span]) and clear[row, span].all():
                    reproduced.append(targets[row, span])
                else:
                    reproduced.append(None)
                    prompts.append(batch["input_ids"][row, : int(span[0]) + 1])  # (P,) up to the answer
                    images.append(batch["images"][row])
        texts = self.tokenizer.batch_decode(
            [ids for ids in reproduced if ids is not None], skip_special_tokens=True
        )
        texts = iter(text.strip() for text in texts)
        generated = iter(self._generate_from(prompts, images) if prompts else [])
        return [next(texts) if ids is not None else next(generated) for ids in reproduced]

    def _log_evaluation(self, stage: str, loss_metric: MeanMetric, vqa_metric: VQAAccuracy) -> None:
        loss = loss_metric.compute()
        self.log(f"{stage}/loss", loss)
        self.log(f"{stage}/ppl", torch.exp(loss))
        loss_metric.reset()
        # every rank computes (an all-gather under DDP), also one that scored nothing itself
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before the ``update``.*")
            accuracies = vqa_metric.compute()
        for key, value in accuracies.items():  # none when no rank scored an answer (captions)
            self.log(f"{stage}/vqa_acc" if key == "overall" else f"{stage}/vqa_acc_{key}", value)
        vqa_metric.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss, self.val_vqa)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val", self.val_loss, self.val_vqa)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss, self.test_vqa)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test", self.test_loss, self.test_vqa)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """One row per answer, as stgc.predictions.AnswerWriter writes it: the record's (id,
        occurrence) key and turn, the question, the generated answer, the file's answer (None when
        empty) and the question type."""
        if is_empty(batch):
            return []
        generated = self.answer(batch)
        return [
            {
                "id": record_id,
                "occurrence": occurrence,
                "turn": turn,
                "question": question,
                "prediction": prediction,
                "reference": reference or None,
                "question_type": question_type,
            }
            for (record_id, occurrence), turn, question, prediction, reference, question_type in zip(
                batch["keys"], batch["turns"], batch["questions"], generated, batch["answers"],
                batch["question_types"], strict=True,
            )
        ]  # fmt: skip

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        trained = [p for p in self.parameters() if p.requires_grad]
        return adamw_warmup_cosine(self, trained, h.lr, h.weight_decay, h.warmup_ratio)
