"""Conversation templates: a Record becomes input_ids and labels, built segment by segment.

Each text segment is tokenized on its own (add_special_tokens=False) and the ids are concatenated,
so label boundaries are exact for any tokenizer. The image placeholder becomes the image's ids
(num_image_tokens IMAGE_TOKEN_ID positions, where the model splices the projected patch embeddings; a
processor model's own image text, stgc.data.processor). Every trained answer ends with the tokenizer's
eos token, where generation stops.
"""

import itertools
from dataclasses import dataclass

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from stgc.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID
from stgc.data.records import Record

DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Segment:
    """A run of token ids; train says whether the LM loss is taken on them, image whether they are an
    image's (which a cut by max_length may not split)."""

    ids: list[int]
    train: bool
    image: bool = False


@dataclass(frozen=True)
class Encoded:
    """Token ids and labels (IGNORE_INDEX where untrained); prompt_length only for one-answer eval samples."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int | None = None  # ids[:prompt_length] end where the evaluated answer starts


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

    def image_ids(self, record: Record) -> list[int]:
        """The ids the record's image occupies: num_image_tokens image-token positions."""
        return [IMAGE_TOKEN_ID] * self.num_image_tokens

    def prompt(self, text: str, record: Record) -> list[Segment]:
        """Untrained prompt text, with the image placeholder expanded to the record's image ids."""
        before, placeholder, after = text.partition(IMAGE_PLACEHOLDER)
        image = [Segment(self.image_ids(record), False, image=True)] if placeholder else []
        return [self.text(before), *image, self.text(after)]

    def answer(self, text: str, train: bool) -> list[Segment]:
        """The answer's ids then eos, both trained when `train`."""
        return [self.text(text, train), Segment([self.tokenizer.eos_token_id], train)]

    def encode(self, record: Record, max_length: int, turn: int | None = None) -> Encoded:
        """Encode and cut to max_length from the end; raise RecordError if the image's ids (all of them)
        or every label is lost."""
        segments = self.segments(record, turn)
        input_ids = [i for s in segments for i in s.ids]
        labels = [i if s.train else IGNORE_INDEX for s in segments for i in s.ids]
        ends = itertools.accumulate(len(s.ids) for s in segments)
        image_end = max((end for end, s in zip(ends, segments, strict=True) if s.image), default=0)
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
        image = self.prompt(IMAGE_PLACEHOLDER, record) if record.image else []
        return [*image, *self.answer(record.turns[0].answer, train=True)]


class InstructionTemplate(Template):
    """Stages II/III (Vicuna v1, as LLaVA-1.5 and MoE-LLaVA): "<system> USER: q ASSISTANT: a</s>USER: ...";
    system_prompt None is Vicuna's (DEFAULT_SYSTEM_PROMPT)."""

    expands_turns = True

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        num_image_tokens: int,
        system_prompt: str | None = None,
    ) -> None:
        super().__init__(tokenizer, num_image_tokens)
        self.system_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt

    def segments(self, record: Record, turn: int | None) -> list[Segment]:
        """All turns with every answer trained, or turns 0..turn with only answer `turn` trained."""
        turns = record.turns if turn is None else record.turns[: turn + 1]
        segments = []
        for i, t in enumerate(turns):
            prefix = f"{self.system_prompt} USER: " if i == 0 else "USER: "
            segments += self.prompt(f"{prefix}{t.question} ASSISTANT:", record)
            segments += self.answer(f" {t.answer}", train=turn is None or i == turn)
        return segments


class ChatTemplate(Template):
    """Stages II/III in the LM's own format: the tokenizer's chat template (`apply_chat_template`).

    The conversation is rendered as text prefix by prefix: through question i with the template's
    generation prompt, then through answer i. The text between the two is answer i as the template
    writes it; it is trained up to and including the tokenizer's eos_token (which must be the
    template's end of turn, e.g. ChatML's <|im_end|>: generation stops there), and what follows the
    eos (ChatML's newline) opens the next prompt; the text after the last eos is dropped. Each piece
    is then tokenized alone, as in the other templates. A template that rewrites earlier text when
    turns are added (not prefix-stable) is refused. Without `system_prompt` no system message is
    given, so the template's own default (if any) applies.
    """

    expands_turns = True

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, num_image_tokens: int, system_prompt: str | None = None
    ) -> None:
        super().__init__(tokenizer, num_image_tokens)
        if not tokenizer.chat_template:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has no chat_template; use template: vicuna_v1 "
                "or set one in its tokenizer_config.json"
            )
        self.system_prompt = system_prompt

    def render(self, record: Record, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        """The chat template's text of `messages`, a ValueError naming the record if it refuses them."""
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except TemplateError as err:
            raise template_error(record, f"the chat template refused it: {err}") from err

    def extension(self, record: Record, before: str, after: str) -> str:
        """What `after` adds to `before`; a ValueError if the template rewrote `before`."""
        if not after.startswith(before):
            raise template_error(
                record,
                "the chat template is not prefix-stable (adding a turn changed the text before it: "
                f"{before[-40:]!r} -> {after[len(before) - 40 : len(before)]!r}); answer spans cannot "
                "be located, use template: vicuna_v1",
            )
        return after[len(before) :]

    def segments(self, record: Record, turn: int | None) -> list[Segment]:
        """All turns with every answer trained, or turns 0..turn with only answer `turn` trained."""
        turns = record.turns if turn is None else record.turns[: turn + 1]
        eos = self.tokenizer.eos_token
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        rendered, untrained, prompts, segments = "", "", "", []
        for i, t in enumerate(turns):
            messages.append({"role": "user", "content": t.question})
            with_question = self.render(record, messages, generation_prompt=True)
            messages.append({"role": "assistant", "content": t.answer})
            with_answer = self.render(record, messages, generation_prompt=False)
            untrained += self.extension(record, rendered, with_question)
            written = self.extension(record, with_question, with_answer)  # the answer and what ends it
            end = written.rfind(eos)
            if end < 0:
                raise template_error(
                    record,
                    f"the chat template writes no eos_token {eos!r} after the answer ({written!r}); "
                    "set the tokenizer's eos_token to its end-of-turn token",
                )
            segments += [
                *self.prompt(untrained, record),
                *self.answer(written[:end], train=turn is None or i == turn),
            ]
            prompts += untrained
            untrained, rendered = written[end + len(eos) :], with_answer
        if prompts.count(IMAGE_PLACEHOLDER) != (1 if record.image else 0):
            raise template_error(
                record,
                f"the chat template's prompts hold {prompts.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} "
                f"placeholders, expected {int(bool(record.image))}",
            )
        return segments


def template_error(record: Record, detail: str) -> ValueError:
    """An error naming the record, as RecordError does, but never skipped as a bad record: the
    template, not the record, is at fault, so the run stops."""
    return ValueError(str(record.error("chat_template", detail)))
