"""Templates: exact ids and labels, image-token expansion, truncation, one-answer eval samples."""

import re
from pathlib import Path

import pytest

from stgc.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from stgc.data import InstructionDataModule
from stgc.data.records import Record, RecordError, Turn
from stgc.data.templates import DEFAULT_SYSTEM_PROMPT, ChatTemplate, InstructionTemplate, PlainTemplate
from support.chat_templates import CHAT_TEMPLATES, CHATML, LLAMA2, save_chat_tokenizer

N_IMAGE = 4
RECORD = Record(
    "r1",
    Path("img.png"),
    (Turn("<image>\nwhat color is the shape?", "blue"), Turn("is there a circle?", "no")),
    "file.json",
)


def expected(tokenizer, segments: list[tuple[str | list[int], bool]]) -> tuple[list[int], list[int]]:
    """Ids and labels built independently: each text tokenized alone, ids given as lists kept as is."""
    ids, labels = [], []
    for piece, train in segments:
        piece_ids = (
            piece if isinstance(piece, list) else tokenizer(piece, add_special_tokens=False)["input_ids"]
        )
        ids += piece_ids
        labels += piece_ids if train else [IGNORE_INDEX] * len(piece_ids)
    return ids, labels


def test_plain_exact(easy_vqa_tokenizer):
    tok = easy_vqa_tokenizer
    encoded = PlainTemplate(tok, N_IMAGE).encode(RECORD, max_length=100)
    ids, labels = expected(
        tok, [([IMAGE_TOKEN_ID] * N_IMAGE, False), ("blue", True), ([tok.eos_token_id], True)]
    )
    assert (encoded.input_ids, encoded.labels, encoded.prompt_length) == (ids, labels, None)


def instruction_segments(tok, system: str = DEFAULT_SYSTEM_PROMPT) -> list:
    """The Vicuna-v1 segments of RECORD, every answer trained."""
    return [
        (f"{system} USER: ", False),
        ([IMAGE_TOKEN_ID] * N_IMAGE, False),
        ("\nwhat color is the shape? ASSISTANT:", False),
        (" blue", True),
        ([tok.eos_token_id], True),
        ("USER: is there a circle? ASSISTANT:", False),
        (" no", True),
        ([tok.eos_token_id], True),
    ]


def test_instruction_exact(easy_vqa_tokenizer):
    tok = easy_vqa_tokenizer
    encoded = InstructionTemplate(tok, N_IMAGE, system_prompt="Be brief.").encode(RECORD, max_length=500)
    assert (encoded.input_ids, encoded.labels) == expected(tok, instruction_segments(tok, "Be brief."))


def test_image_tokens_are_one_consecutive_run(easy_vqa_tokenizer):
    encoded = InstructionTemplate(easy_vqa_tokenizer, N_IMAGE).encode(RECORD, max_length=500)
    positions = [k for k, i in enumerate(encoded.input_ids) if i == IMAGE_TOKEN_ID]
    assert len(positions) == N_IMAGE and positions == list(range(positions[0], positions[0] + N_IMAGE))
    assert all(encoded.labels[k] == IGNORE_INDEX for k in positions)


def test_text_only_record_has_no_image_ids(easy_vqa_tokenizer):
    record = Record("t", None, (Turn("hi", "hello"),), "file.json")
    for template in (PlainTemplate, InstructionTemplate):
        assert IMAGE_TOKEN_ID not in template(easy_vqa_tokenizer, N_IMAGE).encode(record, 500).input_ids


def test_eval_sample_trains_only_its_answer(easy_vqa_tokenizer):
    tok = easy_vqa_tokenizer
    encoded = InstructionTemplate(tok, N_IMAGE).encode(RECORD, max_length=500, turn=1)
    segments = instruction_segments(tok)
    segments[3:5] = [(" blue", False), ([tok.eos_token_id], False)]
    ids, labels = expected(tok, segments)
    assert (encoded.input_ids, encoded.labels) == (ids, labels)
    prompt, _ = expected(tok, segments[:-2])
    assert encoded.prompt_length == len(prompt)
    first = InstructionTemplate(tok, N_IMAGE).encode(RECORD, max_length=500, turn=0)
    assert first.input_ids == expected(tok, segments[:5])[0]


def test_truncation_cuts_the_end(easy_vqa_tokenizer):
    template = InstructionTemplate(easy_vqa_tokenizer, N_IMAGE)
    full = template.encode(RECORD, max_length=500)
    cut = template.encode(RECORD, max_length=len(full.input_ids) - 3)
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]


def test_truncation_never_cuts_image_tokens(easy_vqa_tokenizer):
    template = PlainTemplate(easy_vqa_tokenizer, N_IMAGE)
    with pytest.raises(RecordError, match=r"file.json: record 'r1': prefix through the image") as err:
        template.encode(RECORD, max_length=N_IMAGE - 1)
    assert err.value.reason == "too_long"


def test_all_labels_masked_after_truncation(easy_vqa_tokenizer):
    template = PlainTemplate(easy_vqa_tokenizer, N_IMAGE)
    with pytest.raises(RecordError, match=r"file.json: record 'r1': no trained token") as err:
        template.encode(RECORD, max_length=N_IMAGE)
    assert err.value.reason == "all_masked"


# -- the tokenizer's own chat template ------------------------------------------------------------
TEXT_ONLY = Record("t", None, (Turn("say hi", "hello"), Turn("and again?", " hello there ")), "file.json")


@pytest.fixture(scope="module")
def chat_tokenizers(easy_vqa_dir, tmp_path_factory):
    """The easy-vqa tokenizer with each chat template, saved locally and loaded back."""
    return {
        name: save_chat_tokenizer(easy_vqa_dir / "tokenizer", name, tmp_path_factory.mktemp(name))
        for name in CHAT_TEMPLATES
    }


def chatml_segments(tok, record: Record, system: str = "You are a helpful assistant.") -> list:
    """The ChatML layout written out by hand: every answer and its <|im_end|> trained."""
    segments, sep = [], f"<|im_start|>system\n{system}<|im_end|>\n"
    for t in record.turns:
        before, image, after = t.question.partition("<image>")
        segments += [(f"{sep}<|im_start|>user\n{before}", False)]
        segments += [([IMAGE_TOKEN_ID] * N_IMAGE, False), (after, False)] if image else []
        segments += [
            ("<|im_end|>\n<|im_start|>assistant\n", False),
            (t.answer, True),
            ([tok.eos_token_id], True),
        ]
        sep = "\n"
    return segments


def llama2_segments(tok, record: Record) -> list:
    """The Llama-2 layout written out by hand: " answer " and </s> trained, each turn opened by <s>."""
    segments = []
    for t in record.turns:
        before, image, after = t.question.strip().partition("<image>")
        segments += [(f"<s>[INST] {before}", False)]
        segments += [([IMAGE_TOKEN_ID] * N_IMAGE, False), (after, False)] if image else []
        segments += [(" [/INST]", False), (f" {t.answer.strip()} ", True), ([tok.eos_token_id], True)]
    return segments


def trained_runs(encoded) -> list[list[int]]:
    """The label ids of each maximal run of trained positions."""
    runs, previous = [], IGNORE_INDEX
    for label in encoded.labels:
        if label != IGNORE_INDEX:
            runs[-1:] = [runs[-1] + [label]] if previous != IGNORE_INDEX else [*runs[-1:], [label]]
        previous = label
    return runs


@pytest.mark.parametrize("style", ["chatml", "llama2"])
@pytest.mark.parametrize("record", [RECORD, TEXT_ONLY], ids=["image", "text_only"])
def test_chat_template_exact(chat_tokenizers, style, record):
    tok = chat_tokenizers[style]
    encoded = ChatTemplate(tok, N_IMAGE).encode(record, max_length=500)
    layout = chatml_segments if style == "chatml" else llama2_segments
    assert (encoded.input_ids, encoded.labels) == expected(tok, layout(tok, record))
    # brute force: the trained tokens are, turn by turn, the answer as the template writes it, then eos
    written = [t.answer if style == "chatml" else f" {t.answer.strip()} " for t in record.turns]
    assert trained_runs(encoded) == [
        tok(w, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for w in written
    ]
    assert encoded.input_ids.count(IMAGE_TOKEN_ID) == (N_IMAGE if record.image else 0)


def test_chat_template_text_matches_apply_chat_template(chat_tokenizers):
    """Joined back to text, the ids are the template's own rendering (image tokens as the placeholder),
    less what follows the last eos."""
    for tok in chat_tokenizers.values():
        encoded = ChatTemplate(tok, N_IMAGE).encode(RECORD, max_length=500)
        messages = [
            m
            for t in RECORD.turns
            for m in ({"role": "user", "content": t.question}, {"role": "assistant", "content": t.answer})
        ]
        rendered = tok.apply_chat_template(messages, tokenize=False)
        ids = encoded.input_ids
        first = ids.index(IMAGE_TOKEN_ID)
        text = tok.decode(ids[:first]) + "<image>" + tok.decode(ids[first + N_IMAGE :])
        assert (
            rendered.startswith(text)
            and rendered[len(text) :] == rendered[rendered.rindex(tok.eos_token) + len(tok.eos_token) :]
        )


def test_chat_template_system_prompt(chat_tokenizers):
    tok = chat_tokenizers["chatml"]
    encoded = ChatTemplate(tok, N_IMAGE, system_prompt="Be brief.").encode(RECORD, max_length=500)
    assert (encoded.input_ids, encoded.labels) == expected(tok, chatml_segments(tok, RECORD, "Be brief."))


@pytest.mark.parametrize("style", ["chatml", "llama2"])
def test_chat_eval_sample_trains_only_its_answer(chat_tokenizers, style):
    tok = chat_tokenizers[style]
    layout = chatml_segments if style == "chatml" else llama2_segments
    encoded = ChatTemplate(tok, N_IMAGE).encode(RECORD, max_length=500, turn=1)
    segments = layout(tok, RECORD)
    first_answer = [k for k, (_, train) in enumerate(segments) if train][:2]
    for k in first_answer:
        segments[k] = (segments[k][0], False)
    assert (encoded.input_ids, encoded.labels) == expected(tok, segments)
    prompt, _ = expected(tok, segments[:-2])  # through the generation prompt of the second answer
    assert encoded.prompt_length == len(prompt)
    first = ChatTemplate(tok, N_IMAGE).encode(RECORD, max_length=500, turn=0)
    assert first.input_ids == expected(tok, segments[: first_answer[1] + 1])[0]


def test_chat_template_errors(chat_tokenizers, easy_vqa_tokenizer):
    with pytest.raises(ValueError, match="has no chat_template"):
        ChatTemplate(easy_vqa_tokenizer, N_IMAGE)
    tok = chat_tokenizers["chatml"]
    cases = [  # (template, what the error says)
        (CHATML.replace("'<|im_end|>' + '\\n'", "'\\n'"), "writes no eos_token '<|im_end|>'"),
        (
            CHATML.replace("message['content']", "message['content'].replace('<image>', '')"),
            "0 <image> placeholders",
        ),
        (
            "{{ messages | length }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}",
            "not prefix-stable",
        ),
        (LLAMA2.replace("'<<SYS>>", "raise_exception('no system') + '"), "refused it: no system"),
    ]
    for template, message in cases:
        tok.chat_template = template
        with pytest.raises(ValueError, match=f"file.json: record 'r1': .*{re.escape(message)}") as err:
            ChatTemplate(tok, N_IMAGE, system_prompt="Be brief.").encode(RECORD, max_length=500)
        assert not isinstance(err.value, RecordError)  # the template is at fault: never skipped
    tok.chat_template = CHATML


def test_instruction_datamodule_selects_the_template(chat_tokenizers):
    tok = chat_tokenizers["chatml"]
    chosen = {
        name: InstructionDataModule(train_json="t.json", image_folder=".", template=name).make_template(
            tok, N_IMAGE
        )
        for name in ("vicuna_v1", "chat")
    }
    assert (
        type(chosen["vicuna_v1"]) is InstructionTemplate
        and chosen["vicuna_v1"].system_prompt == DEFAULT_SYSTEM_PROMPT
    )
    assert type(chosen["chat"]) is ChatTemplate and chosen["chat"].system_prompt is None
    with pytest.raises(ValueError, match=r"template='chatml'; choose from \['chat', 'vicuna_v1'\]"):
        InstructionDataModule(train_json="t.json", image_folder=".", template="chatml")
