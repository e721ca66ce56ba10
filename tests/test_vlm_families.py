"""stgc.vlm.TransformersVLMModule on the families whose image text is not one repeated token in brackets,
each with its own offline processor: Llama 4 (tiles, their separators and the global tile),
ERNIE-4.5-VL (token types in the batch, experts per modality) and Aria (a pixel mask, a projector's
queries). The ids of a record are those the processor itself gives for its conversation, labels are its
answers, and `stgc fit` logs image and text conflicts."""

import pytest
import torch
from PIL import Image

from stgc.constants import IMAGE_PLACEHOLDER
from stgc.data.collate import answer_spans
from stgc.method.names import CONFLICT_RATIO_IMAGE, CONFLICT_RATIO_TEXT, metric
from stgc_experiments.tiny_vlm import PROCESSORS
from support.console import stgc
from support.vlm import FIT_STEPS, datamodule, logged_tags, tiny_vlm_args, vlm_records

# family -> its tiny config, the text its processor expands (as the family's chat template writes an
# image), and the model's image positions for each image of SIZES
FAMILIES = {
    "llama4": ("configs/vlm/llama4_tiny.yaml", "<|image|>", {"wide.png": 12, "square.png": 20, "tile.png": 4}),
    "ernie4_5_vl_moe": ("configs/vlm/ernie4_5_vl_moe_tiny.yaml", "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>",
                        {"wide.png": 2, "square.png": 4, "tile.png": 4}),
    "aria": ("configs/vlm/aria_tiny.yaml", "<fim_prefix><|img|><fim_suffix>",
             {"wide.png": 4, "square.png": 4, "tile.png": 4}),
}  # fmt: skip
# (width, height); Llama 4 at 56-pixel tiles: 1 tile, 1x2 tiles and the global one, 2x2 and the global one;
# Aria: one crop of 4 tokens each, its pixel mask half the crop for wide.png
SIZES = {"tile.png": (56, 56), "wide.png": (112, 56), "square.png": (64, 64)}
RECORDS = [
    {"id": "wide", "image": "wide.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat is the shape?"}, {"from": "gpt", "value": "circle", "type": "shape"},
        {"from": "human", "value": "what is its color?"}, {"from": "gpt", "value": "deep red", "type": "color"}]},
    {"id": "text", "conversations": [
        {"from": "human", "value": "is a circle round?"}, {"from": "gpt", "value": "yes", "type": "yes_no"}]},
    {"id": "square", "image": "square.png", "conversations": [
        {"from": "human", "value": "<image>\nis a circle present?"}, {"from": "gpt", "value": "no", "type": "yes_no"}]},
    {"id": "tile", "image": "tile.png", "conversations": [
        {"from": "human", "value": "what color is it?\n<image>"}, {"from": "gpt", "value": "red", "type": "color"}]},
]  # fmt: skip


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_data(request, tmp_path_factory) -> dict:
    """The records' JSON file, their images, the family's tiny processor over their words and its module."""
    family = request.param
    config, image_text, positions = FAMILIES[family]
    data = vlm_records(tmp_path_factory.mktemp(family), RECORDS, SIZES, PROCESSORS[family], config)
    return data | {"image_text": image_text, "positions": positions}


def processor_inputs(data: dict, record: dict) -> dict:
    """What the processor itself gives for the record's whole conversation: its chat template's text with
    the family's image text at the placeholder, and the record's image."""
    processor = data["module"].processor
    messages = [{"role": "user" if turn["from"] == "human" else "assistant", "content": turn["value"]}
                for turn in record["conversations"]]  # fmt: skip
    text = processor.tokenizer.apply_chat_template(messages, tokenize=False)
    text = text.replace(IMAGE_PLACEHOLDER, data["image_text"])
    if "image" not in record:
        return processor(text=[text], add_special_tokens=False, return_tensors="pt")
    with Image.open(data["images"] / record["image"]) as image:
        return processor(
            text=[text], images=[image.convert("RGB")], add_special_tokens=False, return_tensors="pt"
        )


def test_a_record_is_the_ids_pixels_and_token_types_that_the_processor_gives(family_data) -> None:
    module = family_data["module"]
    for i, record in enumerate(RECORDS):
        item = datamodule(family_data).datasets["train"][i]
        expected = processor_inputs(family_data, record)
        assert item["input_ids"].tolist() == expected["input_ids"][0].tolist()
        if "image" not in record:
            assert item["image"] is None
            continue
        positions = int((item["input_ids"] == module.model.config.image_token_id).sum())
        assert positions == family_data["positions"][record["image"]]
        # the model's inputs besides the ids: pixel inputs, and ERNIE's token types
        inputs = module.vision_inputs(item["input_ids"][None], [item["image"]])
        assert set(inputs) == set(expected) - {"input_ids", "attention_mask"}
        for key, value in inputs.items():
            assert torch.equal(value, expected[key].to(value.dtype)), key


def test_labels_are_exactly_the_answers_and_their_end_of_turn(family_data) -> None:
    tokenizer = family_data["module"].tokenizer
    for i, record in enumerate(RECORDS):
        item = datamodule(family_data).datasets["train"][i]
        targets = item["labels"][1:]  # next-token targets, as the model's loss shifts them
        spans = [tokenizer.decode(targets[span]) for span in answer_spans(targets)]
        answers = [turn["value"] for turn in record["conversations"][1::2]]
        assert spans == [f"{answer} {tokenizer.eos_token}" for answer in answers]


def test_a_batch_of_image_and_text_only_rows_trains(family_data) -> None:
    module = family_data["module"]
    batch = next(iter(datamodule(family_data, batch_size=len(RECORDS)).train_dataloader()))
    assert sum(image is None for image in batch["images"]) == 1
    loss = module(batch).loss  # the model checks its image positions against the images' features
    loss.backward()
    assert torch.isfinite(loss)
    trained = {name: p for name, p in module.named_parameters() if p.requires_grad}
    no_grad = [name for name, p in trained.items() if p.grad is None]
    # but ERNIE's router correction biases, which choose experts and take no gradient
    assert trained and all(name.endswith("e_score_correction_bias") for name in no_grad)
    module.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fit_logs_image_and_text_conflicts(family, easy_vqa_dir, tmp_path) -> None:
    config, _, _ = FAMILIES[family]
    fit = stgc("fit", *tiny_vlm_args(family, config, easy_vqa_dir, tmp_path), *FIT_STEPS)
    assert fit.returncode == 0, fit.stderr[-3000:]
    tags = logged_tags(tmp_path / "vlm" / f"{family}_tiny_stgc")
    assert {metric(CONFLICT_RATIO_IMAGE), metric(CONFLICT_RATIO_TEXT), "train/loss", "val/vqa_acc"} <= tags
