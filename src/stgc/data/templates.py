"""Conversation templates: a Record becomes input_ids and labels, built segment by segment.

Each text segment is tokenized on its own (add_special_tokens=False) and the ids are concatenated,
so label boundaries are exact for any tokenizer. The image placeholder becomes num_image_tokens
IMAGE_TOKEN_ID positions, where the model splices the projected patch embeddings.
"""

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from stgc.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID
from stgc.data.records import Record

DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Segment:
    """A run of token ids; train says whether the LM loss is taken on them."""

    ids: list[int]
    train: bool


@dataclass(frozen=True)
class Encoded:
    """Token ids and labels (IGNORE_INDEX where untrained); prompt_length only for one-answer eval samples."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int | None = None  # ids[:prompt_length] end with the evaluated answer's " ASSISTANT:"


class Template:
    """Shared machinery: tokenize segments, concatenate, truncate; subclasses lay out the segments."""

    expands_turns = False  # whether eval makes one sample per answer (with prompt fields)

    def __init__(self, tokenizer: PreTrainedTokenizerBase, num_image_tokens: int) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no eos_token; set one before training"
            )
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens

    def segments(self, record: Record, turn: int | None) -> list[Segment]:
        """Lay out the record (up to `turn` when given, training only that answer)."""
        raise NotImplementedError

    def text(self, text: str, train: bool = False) -> Segment:
        """Tokenize one piece of text without special tokens."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return Segment(ids, train)

    def prompt(self, text: str) -> list[Segment]:
        """Untrained prompt text, with the image placeholder expanded to image-token ids."""
        before, placeholder, after = text.partition(IMAGE_PLACEHOLDER)
        image = [Segment([IMAGE_TOKEN_ID] * self.num_image_tokens, False)] if placeholder else []
        return [self.text(before), *image, self.text(after)]

    def answer(self, text: str, train: bool) -> list[Segment]:
        """The answer's ids then eos, both trained when `train`."""
        return [self.text(text, train), Segment([self.tokenizer.eos_token_id], train)]

    def encode(self, record: Record, max_length: int, turn: int | None = None) -> Encoded:
        """Encode and cut to max_length from the end; raise RecordError if the image or every label is lost."""
        segments = self.segments(record, turn)
        input_ids = [i for s in segments for i in s.ids]
        labels = [i if s.train else IGNORE_INDEX for s in segments for i in s.ids]
        image_end = max((k + 1 for k, i in enumerate(input_ids) if i == IMAGE_TOKEN_ID), default=0)
        if image_end > max_length:
            raise record.error(
                "too_long", f"prefix through the image ({image_end} tokens) exceeds max_length={max_length}"
            )
        if all(label == IGNORE_INDEX for label in labels[:max_length]):
            raise record.error(
                "all_masked", f"no trained token left after truncation to max_length={max_length}"
            )
        # in a one-answer sample the last two segments are that answer and its eos
        prompt_length = None if turn is None else len(input_ids) - len(segments[-2].ids) - 1
        return Encoded(input_ids[:max_length], labels[:max_length], prompt_length)


class PlainTemplate(Template):
    """Stage I (LLaVA "plain"): image tokens + caption + eos, loss on caption and eos only."""

    def segments(self, record: Record, turn: int | None) -> list[Segment]:
        """Image (if any) then the first answer as the caption; the human text is dropped."""
        image = self.prompt(IMAGE_PLACEHOLDER) if record.image else []
        return [*image, *self.answer(record.turns[0].answer, train=True)]


class InstructionTemplate(Template):
    """Stages II/III (Vicuna v1, as LLaVA-1.5): "<system> USER: q ASSISTANT: a</s>USER: ..."."""

    expands_turns = True

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        num_image_tokens: int,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    ) -> None:
        super().__init__(tokenizer, num_image_tokens)
        self.system_prompt = system_prompt

    def segments(self, record: Record, turn: int | None) -> list[Segment]:
        """All turns with every answer trained, or turns 0..turn with only answer `turn` trained."""
        turns = record.turns if turn is None else record.turns[: turn + 1]
        segments = []
        for i, t in enumerate(turns):
            prefix = f"{self.system_prompt} USER: " if i == 0 else "USER: "
            segments += self.prompt(f"{prefix}{t.question} ASSISTANT:")
            segments += self.answer(f" {t.answer}", train=turn is None or i == turn)
        return segments
