"""stgc.vlm.TransformersVLMModule on a tiny random Qwen3-VL-MoE with an offline processor: the data path
(ProcessorTemplate, pixel inputs), its evaluation, and `stgc fit` / `stgc validate` with STGC."""

import json
import shutil

import pytest
import torch
import yaml
from PIL import Image

from stgc.constants import IGNORE_INDEX
from stgc.data import InstructionDataModule
from stgc.data.collate import answer_spans
from stgc.method import STGCMethod
from stgc.method.names import CONFLICT_RATIO_IMAGE, CONFLICT_RATIO_TEXT, metric
from stgc.vlm import TransformersVLMModule
from stgc.vlm.parameters import parameter_groups
from stgc_experiments.tiny_vlm import END_OF_TURN, qwen3_vl_processor
from support.console import stgc
from support.fit import ROOT
from support.vlm import FIT_STEPS, datamodule, logged_tags, tiny_vlm_args, vlm_records

CONFIG = "configs/vlm/qwen3_vl_moe_tiny.yaml"
RECIPE = "configs/vlm/qwen3_vl_moe_30b_a3b.yaml"
SIZES = {"wide.png": (64, 32), "square.png": (64, 64)}  # (width, height): 2 and 4 image tokens
RECORDS = [
    {"id": "a", "image": "wide.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat is the shape?"}, {"from": "gpt", "value": "circle", "type": "shape"},
        {"from": "human", "value": "what is its color?"}, {"from": "gpt", "value": "deep red", "type": "color"}]},
    {"id": "b", "conversations": [
        {"from": "human", "value": "is a circle round?"}, {"from": "gpt", "value": "yes", "type": "yes_no"}]},
    {"id": "a", "image": "square.png", "conversations": [  # the same id again: a second occurrence
        {"from": "human", "value": "<image>\nis a circle present?"}, {"from": "gpt", "value": "no", "type": "yes_no"}]},
]  # fmt: skip


@pytest.fixture(scope="module")
def vlm_data(tmp_path_factory) -> dict:
    """The records' JSON file, their images, a saved processor over their words, and a tiny module."""
    data = vlm_records(tmp_path_factory.mktemp("vlm_data"), RECORDS, SIZES, qwen3_vl_processor, CONFIG)
    return data | {"args": data["module"].hparams}


def test_labels_are_exactly_the_answers_and_their_end_of_turn(vlm_data) -> None:
    tokenizer = vlm_data["module"].tokenizer
    items = [datamodule(vlm_data).datasets["train"][i] for i in range(len(RECORDS))]
    for item, record in zip(items, RECORDS, strict=True):
        answers = [turn["value"] for turn in record["conversations"][1::2]]
        targets = item["labels"][1:]  # next-token targets, as the model's loss shifts them
        spans = [tokenizer.decode(targets[span]) for span in answer_spans(targets)]
        assert spans == [f"{answer} {END_OF_TURN}" for answer in answers]
        trained = item["labels"] != IGNORE_INDEX
        assert torch.equal(item["labels"][trained], item["input_ids"][trained])


def test_image_tokens_are_as_many_as_the_processor_makes_for_the_image(vlm_data) -> None:
    processor = vlm_data["module"].processor
    items = [datamodule(vlm_data).datasets["train"][i] for i in range(len(RECORDS))]
    for item, record in zip(items, RECORDS, strict=True):
        pads = int((item["input_ids"] == processor.image_token_id).sum())
        if "image" not in record:  # text-only: no image tokens, no pixel inputs
            assert pads == 0 and item["image"] is None
            continue
        with Image.open(vlm_data["images"] / record["image"]) as image:
            text = f"{processor.vision_start_token}{processor.image_token}{processor.vision_end_token}"
            expected = processor(text=[text], images=[image.convert("RGB")], return_tensors="pt")
        assert pads == int((expected["input_ids"] == processor.image_token_id).sum()) > 0
        assert torch.equal(item["image"]["image_grid_thw"], expected["image_grid_thw"])
        assert torch.equal(item["image"]["pixel_values"], expected["pixel_values"])
    assert [int((item["input_ids"] == processor.image_token_id).sum()) for item in items] == [2, 0, 4]


def test_a_batch_of_image_and_text_only_rows_trains(vlm_data) -> None:
    module = vlm_data["module"]
    data = datamodule(vlm_data, batch_size=3)
    batch = next(iter(data.train_dataloader()))
    assert sorted(batch["keys"]) == [("a", 1), ("a", 2), ("b", 1)]  # the repeated id: two records
    assert sum(image is None for image in batch["images"]) == 1
    loss = module(batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    trained = [p for p in module.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    module.zero_grad(set_to_none=True)


def test_a_batch_without_images_has_no_pixel_inputs(vlm_data) -> None:
    data = datamodule(vlm_data)
    batch = data.collator([data.datasets["train"][1]])  # record "b", text-only
    assert (
        batch["images"] == [None]
        and vlm_data["module"].vision_inputs(batch["input_ids"], batch["images"]) == {}
    )
    assert torch.isfinite(vlm_data["module"](batch).loss)


def test_a_processor_model_takes_only_the_chat_template(vlm_data) -> None:
    """vicuna_v1 (or stage I's plain template) would place LLaVA's image positions, which it has not."""
    module = vlm_data["module"]
    data = InstructionDataModule(train_json="t.json", image_folder=".", template="vicuna_v1")
    transform = module.image_transform(False)
    with pytest.raises(ValueError, match="only InstructionDataModule.s template: chat places"):
        data.attach(module.tokenizer, transform, transform, module.num_image_tokens, module.processor)


def test_records_cut_by_max_length_are_counted_skips(vlm_data) -> None:
    batch = next(iter(datamodule(vlm_data, max_length=15, batch_size=3).train_dataloader()))
    # the square image's text (4 tokens in brackets) ends after 15 tokens, the wide one's (2) at 15; the
    # others keep their prompts, not their answers
    assert dict(batch["skipped"]) == {("a", 2): "too_long", ("a", 1): "all_masked", ("b", 1): "all_masked"}


def test_bad_image_is_a_counted_skip(vlm_data, tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in SIZES:
        (images / name).write_bytes((vlm_data["images"] / name).read_bytes())
    broken = (images / "square.png").read_bytes()
    (images / "square.png").write_bytes(broken[:60])  # the header reads, the pixels do not
    data = datamodule({**vlm_data, "images": images}, batch_size=3)
    batch = next(iter(data.train_dataloader()))
    assert batch["skipped"] == [(("a", 2), "bad_image")] and len(batch["keys"]) == 2


def test_validation_scores_the_answers_that_greedy_generation_gives(vlm_data) -> None:
    """score_answers (teacher-forced where that suffices) answers as generation from each prompt does,
    both before and after the model learned the answers (then the teacher-forced shortcut answers)."""
    torch.manual_seed(0)
    module = TransformersVLMModule(**{**vlm_data["args"], "trainable": ["lm"], "max_new_tokens": 4})
    data = datamodule(vlm_data, batch_size=3, eval_batch_size=3)
    train = next(iter(data.train_dataloader()))
    batch = next(iter(data.val_dataloader()))
    references = [answer for answers in batch["answers"] for answer in answers]
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for learned in (False, True):
        if learned:
            for _ in range(30):
                module.train()
                module(train).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        module.eval()
        with torch.no_grad():
            scored = module.score_answers(batch, module(batch).logits)  # the val records' answers, in order
        generated = [text for each in data.answer_loader("val") for text in module.answer(each)]
        assert len(scored) == 4 and scored == generated
    # learned: answers that the teacher-forced logits reproduce (so score_answers generated no text for them)
    assert sum(text == reference for text, reference in zip(scored, references, strict=True)) >= 2


# -- the console script ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vlm_fit(easy_vqa_dir, tmp_path_factory) -> dict:
    """`stgc fit` of the tiny Qwen3-VL-MoE with STGC on 36 easy-vqa records (3 steps, one val batch)."""
    root = tmp_path_factory.mktemp("vlm_fit")
    args = tiny_vlm_args("qwen3_vl_moe", CONFIG, easy_vqa_dir, root)
    fit = stgc("fit", *args, *FIT_STEPS)
    folder = root / "vlm" / "qwen3_vl_moe_tiny_stgc"
    return {"args": args, "fit": fit, "folder": folder, "processor": root / "processor"}


def test_fit_logs_image_and_text_conflicts(vlm_fit) -> None:
    assert vlm_fit["fit"].returncode == 0, vlm_fit["fit"].stderr[-3000:]
    tags = logged_tags(vlm_fit["folder"])
    assert {metric(CONFLICT_RATIO_IMAGE), metric(CONFLICT_RATIO_TEXT), "train/loss", "val/vqa_acc"} <= tags
    # the model's own load-balancing loss (router_aux_loss_coef)
    assert {"train/aux_loss", "train/lm_loss"} <= tags


@pytest.mark.slow
def test_validate_of_the_checkpoint_logs_vqa_accuracy(vlm_fit) -> None:
    checkpoint = vlm_fit["folder"] / "checkpoints" / "last.ckpt"
    result = stgc("validate", *vlm_fit["args"], f"--ckpt_path={checkpoint}")
    assert result.returncode == 0, result.stderr[-3000:]
    tags = logged_tags(vlm_fit["folder"] / "validate")
    assert {"val/vqa_acc", "val/vqa_acc_shape", "val/vqa_acc_color", "val/vqa_acc_yes_no"} <= set(tags)


@pytest.mark.slow
def test_predict_writes_a_row_per_test_answer(vlm_fit) -> None:
    checkpoint = vlm_fit["folder"] / "checkpoints" / "last.ckpt"
    result = stgc(
        "predict", *vlm_fit["args"], f"--ckpt_path={checkpoint}", "--trainer.limit_predict_batches=1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (vlm_fit["folder"] / "predict" / "answers.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 8  # one eval batch of one-question records
    fields = {"id", "occurrence", "turn", "question", "prediction", "reference", "question_type"}
    assert all(set(row) == fields and isinstance(row["prediction"], str) for row in rows)


def test_init_from_starts_from_the_checkpoint(vlm_fit) -> None:
    checkpoint = vlm_fit["folder"] / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    hparams = {k: v for k, v in saved["hyper_parameters"].items() if not k.startswith("_")}  # LightningCLI's
    module = TransformersVLMModule(**{**hparams, "init_from": str(checkpoint)})
    weights = module.model.state_dict().items()
    assert all(torch.equal(value, saved["state_dict"][f"model.{key}"]) for key, value in weights)


def test_trainable_groups_are_found_by_module_structure(vlm_data) -> None:
    model = vlm_data["module"].model
    groups = {name: {id(p) for p in params} for name, params in parameter_groups(model).items()}
    blocks = [layer.mlp for layer in model.model.language_model.layers]  # every layer is MoE
    assert groups["experts"] == {id(p) for block in blocks for p in block.experts.parameters()}
    assert groups["routers"] == {id(block.gate.weight) for block in blocks}
    assert groups["projector"] == {id(p) for p in model.model.visual.merger.parameters()} | {
        id(p) for p in model.model.visual.deepstack_merger_list.parameters()
    }
    assert groups["vision_tower"] | groups["projector"] == {id(p) for p in model.model.visual.parameters()}
    assert not groups["vision_tower"] & groups["projector"]
    assert groups["experts"] | groups["routers"] < groups["lm"]
    assert {id(p) for p in model.parameters() if p.requires_grad} == groups["experts"] | groups["routers"]


@pytest.mark.slow
def test_the_30b_recipe_runs_on_a_tiny_stand_in_checkpoint(vlm_fit, easy_vqa_dir, tmp_path) -> None:
    """configs/vlm/qwen3_vl_moe_30b_a3b.yaml's model, data and STGC on a local checkpoint folder (model
    and processor) of the tiny model, one CPU process: FSDP2, bf16 and the real checkpoint stay untested."""
    stand_in = shutil.copytree(vlm_fit["processor"], tmp_path / "checkpoint")
    tiny = yaml.safe_load((ROOT / CONFIG).read_text())["model"]["init_args"]
    TransformersVLMModule(**{**tiny, "processor": str(stand_in)}).model.save_pretrained(stand_in)
    result = stgc(
        "fit", "-c", "configs/trainer.yaml", "-c", "configs/trainer/fsdp2.yaml", "-c", RECIPE,
        f"--model.init_args.model_path={stand_in}", f"--model.init_args.processor={stand_in}",
        f"--data.init_args.train_json={easy_vqa_dir / 'instruct_train.json'}",
        f"--data.init_args.image_folder={easy_vqa_dir / 'images'}",
        "--data.init_args.limit_records=36", "--data.init_args.val_fraction=0.2", "--data.init_args.num_workers=0",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
        "--trainer.precision=32-true", "--trainer.accumulate_grad_batches=1", "--trainer.max_steps=2",
        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    tags = logged_tags(tmp_path / "vlm" / "qwen3_vl_30b_a3b_stgc")
    assert {metric(CONFLICT_RATIO_TEXT), "train/loss", "val/vqa_acc"} <= tags


@pytest.mark.slow
def test_glm4v_moe_fits_and_logs_image_and_text_conflicts(easy_vqa_dir, tmp_path) -> None:
    """GLM-4.5V (Glm4vProcessor; a sigmoid router with a correction bias, group-limited top-k and a
    shared expert) through the same module, DataModule and console script."""
    args = tiny_vlm_args("glm4v_moe", "configs/vlm/glm4v_moe_tiny.yaml", easy_vqa_dir, tmp_path)
    fit = stgc("fit", *args, *FIT_STEPS)
    assert fit.returncode == 0, fit.stderr[-3000:]
    tags = logged_tags(tmp_path / "vlm" / "glm4v_moe_tiny_stgc")
    assert {metric(CONFLICT_RATIO_IMAGE), metric(CONFLICT_RATIO_TEXT), "train/loss", "val/vqa_acc"} <= tags


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_stgc_fit_on_two_processes(strategy, easy_vqa_dir, tmp_path) -> None:
    """The tiny Qwen3-VL-MoE with STGC under configs/trainer/<strategy>.yaml on 2 CPU processes (FSDP2:
    each decoder layer and vision block sharded, stgc.vlm's configure_model)."""
    args = tiny_vlm_args("qwen3_vl_moe", CONFIG, easy_vqa_dir, tmp_path, records=48)
    strategy_args = [
        "-c",
        f"configs/trainer/{strategy}.yaml",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
    ]
    fit = stgc("fit", *args, *strategy_args, *FIT_STEPS)
    assert fit.returncode == 0, fit.stderr[-3000:]
    tags = logged_tags(tmp_path / "vlm" / "qwen3_vl_moe_tiny_stgc")
    assert {metric(CONFLICT_RATIO_IMAGE), metric(CONFLICT_RATIO_TEXT), "val/vqa_acc"} <= tags


def test_gradient_checkpointing_gives_the_cosines_and_gradients_of_a_run_without(vlm_data) -> None:
    """The same batch through the same weights with and without recomputation: STGC's cosines of every
    layer and the experts' gradients agree (each expert's inputs are captured in the recomputation)."""
    batch = next(iter(datamodule(vlm_data, batch_size=3).train_dataloader()))
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        args = {**vlm_data["args"], "gradient_checkpointing": checkpointing}
        module = TransformersVLMModule(**args)
        module.train()
        assert module.model.is_gradient_checkpointing == checkpointing
        method = STGCMethod(threshold=0.0, loss_weight=0.0)
        method.attach(module)
        method.begin(batch)
        module(batch).loss.backward()
        layers = method.after_backward().layers
        experts = {name: p.grad.clone() for name, p in module.named_parameters() if "experts" in name}
        runs.append(([c.cosine for c in layers], experts))
    (plain, plain_grads), (recomputed, recomputed_grads) = runs
    assert len(plain) == 2 and all(c.numel() for c in plain)
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(a, b)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(recomputed_grads[name], grad, msg=name)
