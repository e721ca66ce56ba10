"""Dataset, collate and DataModules: padding, bad images, eval expansion, seeded split."""

import re
from types import SimpleNamespace

import pytest
import torch
from torchvision import transforms

from stgc.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from stgc.data import InstructionDataModule, LlavaCollator, PretrainDataModule
from stgc.data.collate import is_empty
from stgc.data.dataset import output_size
from stgc.model.vision import VisionTower

N_IMAGE = 4
PAD = 0


to_tensor = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])  # (3, 8, 8) in [0, 1]


def record(i: int, n_turns: int = 2, image: bool = True) -> dict:
    """A record with n_turns typed answers."""
    turns = []
    for k in range(n_turns):
        turns += [
            {"from": "human", "value": ("<image>\n" if image and k == 0 else "") + f"question {k}?"},
            {"from": "gpt", "value": f"answer {i} {k}", "type": "yes/no" if k else "color"},
        ]
    return {"id": f"r{i}", **({"image": f"r{i}.png"} if image else {}), "conversations": turns}


def make_dm(cls, path, images, tokenizer, **kwargs):
    """A DataModule attached to the tokenizer and test transforms."""
    dm = cls(train_json=str(path), image_folder=str(images), **kwargs)
    dm.attach(tokenizer, to_tensor, to_tensor, N_IMAGE)
    return dm


def test_collate_pads_right_and_prompts_left():
    items = [
        {
            "key": ("r0", 1),
            "index": 0,
            "image": torch.zeros(3, 2, 2),
            "input_ids": torch.tensor([5, 6, 7]),
            "labels": torch.tensor([-100, 6, 7]),
            "prompt_ids": torch.tensor([5]),
            "turn": 0,
            "question": "q0",
            "answer": "a",
            "question_type": "color",
        },
        {"skipped": (("r1", 1), "bad_image")},
        {
            "key": ("r0", 2),
            "index": 2,
            "image": torch.ones(3, 2, 2),
            "input_ids": torch.tensor([8]),
            "labels": torch.tensor([8]),
            "prompt_ids": torch.tensor([8, 9]),
            "turn": 1,
            "question": "q1",
            "answer": "b",
            "question_type": "other",
        },
    ]
    batch = LlavaCollator(pad_token_id=PAD)(items)
    assert batch["images"].shape == (2, 3, 2, 2) and batch["images"].dtype == torch.float32
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["prompt_input_ids"].tolist() == [[PAD, 5], [8, 9]]
    assert batch["prompt_attention_mask"].tolist() == [[0, 1], [1, 1]]
    assert (batch["keys"], batch["indices"], batch["turns"], batch["questions"]) == (
        [("r0", 1), ("r0", 2)],  # one id, two records
        [0, 2],
        [0, 1],
        ["q0", "q1"],
    )
    assert (batch["answers"], batch["question_types"], batch["skipped"]) == (
        ["a", "b"],
        ["color", "other"],
        [(("r1", 1), "bad_image")],
    )
    assert all(
        batch[k].dtype == torch.long for k in ("input_ids", "attention_mask", "labels", "prompt_input_ids")
    )
    empty = LlavaCollator(PAD)([{"skipped": (("r1", 1), "bad_image")}, {"skipped": (("r3", 1), "too_long")}])
    assert is_empty(empty) and empty == {"skipped": [(("r1", 1), "bad_image"), (("r3", 1), "too_long")]}


def test_train_batch(write_llava, easy_vqa_tokenizer):
    path, images = write_llava([record(i) for i in range(2)] + [record(2, image=False)])
    dm = make_dm(InstructionDataModule, path, images, easy_vqa_tokenizer, val_json=str(path), batch_size=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"keys", "indices", "images", "input_ids", "attention_mask", "labels", "skipped"}
    assert batch["images"].shape == (3, 3, 8, 8)
    n_image_ids = (batch["input_ids"] == IMAGE_TOKEN_ID).sum(1).sort().values.tolist()
    assert n_image_ids == [0, N_IMAGE, N_IMAGE]
    text_only = (batch["input_ids"] == IMAGE_TOKEN_ID).sum(1) == 0
    assert batch["images"][text_only].abs().sum() == 0
    assert (batch["input_ids"][batch["attention_mask"] == 0] == easy_vqa_tokenizer.pad_token_id).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_eval_samples_are_conversations_with_their_answers(write_llava, easy_vqa_tokenizer):
    path, images = write_llava([record(0, n_turns=3), record(1, n_turns=1)])
    dm = make_dm(
        InstructionDataModule, path, images, easy_vqa_tokenizer, val_json=str(path), eval_batch_size=8
    )
    dm.setup("fit")
    assert len(dm.datasets["train"]) == len(dm.datasets["val"]) == 2
    batch = next(iter(dm.val_dataloader()))
    assert batch["answers"] == [["answer 0 0", "answer 0 1", "answer 0 2"], ["answer 1 0"]]
    assert batch["question_types"] == [["color", "yes/no", "yes/no"], ["color"]]
    eos = easy_vqa_tokenizer.eos_token_id
    for row, answers in enumerate(batch["answers"]):  # labels: every answer and its eos, in order
        expected = [
            i
            for a in answers
            for i in [*easy_vqa_tokenizer(" " + a, add_special_tokens=False)["input_ids"], eos]
        ]
        assert batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist() == expected


def test_answer_loader_has_one_sample_per_answer_with_its_prompt(write_llava, easy_vqa_tokenizer):
    path, images = write_llava([record(0, n_turns=3), record(1, n_turns=1)])
    dm = make_dm(
        InstructionDataModule, path, images, easy_vqa_tokenizer, val_json=str(path), eval_batch_size=8
    )
    dm.setup("fit")
    batch = next(iter(dm.answer_loader("val")))
    assert batch["answers"] == ["answer 0 0", "answer 0 1", "answer 0 2", "answer 1 0"]
    assert batch["question_types"] == ["color", "yes/no", "yes/no", "color"]
    for row in range(4):  # labels: exactly that answer and its eos; the prompt ends where they begin
        trained = batch["labels"][row] != IGNORE_INDEX
        answer_ids = easy_vqa_tokenizer(" " + batch["answers"][row], add_special_tokens=False)["input_ids"]
        assert batch["labels"][row][trained].tolist() == [*answer_ids, easy_vqa_tokenizer.eos_token_id]
        prompt = batch["prompt_input_ids"][row][batch["prompt_attention_mask"][row] == 1]
        start = int(trained.nonzero()[0])
        assert prompt.tolist() == batch["input_ids"][row][:start].tolist()


def test_plain_eval_has_no_prompt_fields(write_llava, easy_vqa_tokenizer):
    path, images = write_llava([record(0), record(1)])
    dm = make_dm(PretrainDataModule, path, images, easy_vqa_tokenizer, val_json=str(path))
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 2 and "prompt_input_ids" not in batch and "answers" not in batch


def test_undecodable_image_strict(write_llava, easy_vqa_tokenizer):
    path, images = write_llava([record(0), record(1)], broken_images=("r1.png",))
    dm = make_dm(
        PretrainDataModule, path, images, easy_vqa_tokenizer, val_json=str(path), skip_bad_records=False
    )
    dm.setup("fit")
    with pytest.raises(ValueError, match=re.escape(f"{path}: record 'r1': cannot decode")):
        next(iter(dm.val_dataloader()))


def test_undecodable_image_skipped(write_llava, easy_vqa_tokenizer):
    path, images = write_llava([record(0), record(1), record(2)], broken_images=("r1.png",))
    dm = make_dm(PretrainDataModule, path, images, easy_vqa_tokenizer, val_json=str(path))
    dm.setup("fit")
    with pytest.warns(UserWarning, match="r1"):
        batch = next(iter(dm.val_dataloader()))
    assert batch["skipped"] == [(("r1", 1), "bad_image")] and batch["keys"] == [("r0", 1), ("r2", 1)]


def test_all_masked_after_truncation_skipped(write_llava, easy_vqa_tokenizer):
    path, images = write_llava([record(0), record(1)])
    dm = make_dm(PretrainDataModule, path, images, easy_vqa_tokenizer, val_json=str(path), max_length=N_IMAGE)
    dm.setup("fit")
    with pytest.warns(UserWarning, match="no trained token"):
        batch = next(iter(dm.val_dataloader()))
    assert is_empty(batch) and batch["skipped"] == [(("r0", 1), "all_masked"), (("r1", 1), "all_masked")]


def test_seeded_split(write_llava, easy_vqa_tokenizer):
    path, images = write_llava([record(i, n_turns=1) for i in range(40)])

    def split(seed: int) -> tuple[list[str], list[str]]:
        dm = make_dm(PretrainDataModule, path, images, easy_vqa_tokenizer, val_fraction=0.25, seed=seed)
        dm.setup("fit")
        return [r.id for r in dm.datasets["train"].records], [r.id for r in dm.datasets["val"].records]

    train, val = split(0)
    assert len(val) == 10 and sorted(train + val) == sorted(f"r{i}" for i in range(40))
    assert split(0) == (train, val) and split(1)[1] != val


def test_split_keeps_the_records_of_one_image_together(write_llava, easy_vqa_tokenizer):
    """Five questions per image, one record each: val gets whole images, never seen in training."""
    records = [record(5 * i + k, n_turns=1) | {"image": f"img{i}.png"} for i in range(8) for k in range(5)]
    records += [record(100 + t, image=False) for t in range(4)]
    path, images = write_llava(records)
    dm = make_dm(PretrainDataModule, path, images, easy_vqa_tokenizer, val_fraction=0.25)
    dm.setup("fit")
    train, val = dm.datasets["train"].records, dm.datasets["val"].records
    assert sorted(r.id for r in train + val) == sorted(r["id"] for r in records)
    val_images = {r.image for r in val if r.image}
    assert not val_images & {r.image for r in train if r.image}
    assert all(sum(r.image == image for r in val) == 5 for image in val_images)
    assert len(val_images) + sum(r.image is None for r in val) == 3  # a quarter of the 12 groups


def test_train_loader_order_is_seeded(write_llava, easy_vqa_tokenizer):
    path, images = write_llava([record(i, n_turns=1) for i in range(20)])

    def order(seed: int) -> list[list[list[int]]]:
        dm = make_dm(
            PretrainDataModule, path, images, easy_vqa_tokenizer, val_json=str(path), batch_size=4, seed=seed
        )
        dm.setup("fit")
        return [b["input_ids"].tolist() for b in dm.train_dataloader()]

    assert order(3) == order(3) != order(4)


def test_order_seed_changes_the_training_order_and_keeps_the_split(write_llava, easy_vqa_tokenizer):
    """How the study varies its data order with the seed: every arm keeps the seed-0 split."""
    path, images = write_llava([record(i, n_turns=1) for i in range(40)])

    def run(**seeds: int) -> tuple[list[str], list[list[list[int]]]]:
        dm = make_dm(
            PretrainDataModule, path, images, easy_vqa_tokenizer, val_fraction=0.25, batch_size=4, **seeds
        )
        dm.setup("fit")
        return [r.id for r in dm.datasets["val"].records], [
            b["input_ids"].tolist() for b in dm.train_dataloader()
        ]

    val, order = run()
    assert run(order_seed=0) == (val, order)  # the default: `seed`
    other_val, other_order = run(order_seed=1)
    assert other_val == val and other_order != order


def test_group_by_length_batches_similar_lengths_and_sorts_eval(write_llava, easy_vqa_tokenizer):
    turns = [1, 6, 3, 1, 6, 3]
    path, images = write_llava([record(i, n_turns=n) for i, n in enumerate(turns)])
    dm = make_dm(
        InstructionDataModule,
        path,
        images,
        easy_vqa_tokenizer,
        val_json=str(path),
        test_json=str(path),
        batch_size=2,
        eval_batch_size=100,
        group_by_length=True,
    )
    dm.setup("fit")
    dm.setup("test")
    lengths = dm.datasets["train"].lengths
    # words ("<image>", then "question k?" and "answer i k" per turn) plus the image tokens
    assert lengths == [1 + len(r.turns) * 5 + N_IMAGE for r in dm.datasets["train"].records]
    masks = [b["attention_mask"] for b in dm.train_dataloader()]
    padding = sum((m == 0).sum().item() for m in masks)
    assert len(masks) == 3 and padding <= 4, "batches pair equal turn counts (shuffled, 1 vs 6 turns pad ~60)"
    val = next(iter(dm.val_dataloader()))  # every conversation, shortest first
    assert val["input_ids"].shape[0] == len(turns) and sorted(map(len, val["answers"])) == sorted(turns)
    assert val["attention_mask"].sum(1).tolist() == sorted(val["attention_mask"].sum(1).tolist())
    predicted = next(iter(dm.predict_dataloader()))  # file order, as predictions are read
    assert predicted["answers"][:3] == ["answer 0 0", "answer 1 0", "answer 1 1"]


def test_test_loader_needs_test_json(write_llava, easy_vqa_tokenizer):
    path, images = write_llava([record(0)])
    dm = make_dm(PretrainDataModule, path, images, easy_vqa_tokenizer)
    with pytest.raises(ValueError, match="test_json is not set"):
        dm.setup("test")


def test_setup_takes_model_inputs_from_the_trainer(write_llava, easy_vqa_tokenizer):
    path, images = write_llava([record(0), record(1)])
    dm = InstructionDataModule(train_json=str(path), image_folder=str(images), test_json=str(path))
    with pytest.raises(RuntimeError, match="call attach"):
        dm.setup("test")
    model = SimpleNamespace(
        tokenizer=easy_vqa_tokenizer, image_transform=lambda train: to_tensor, num_image_tokens=2
    )
    dm.trainer = SimpleNamespace(lightning_module=model, world_size=1, global_rank=0, accelerator=None)
    dm.setup("test")
    assert (next(iter(dm.test_dataloader()))["input_ids"] == IMAGE_TOKEN_ID).sum() == 2 * 2  # 2 records


def test_easy_vqa_end_to_end(easy_vqa_dir, easy_vqa_tokenizer):
    dm = InstructionDataModule(
        train_json=str(easy_vqa_dir / "instruct_train.json"),
        image_folder=str(easy_vqa_dir / "images"),
        test_json=str(easy_vqa_dir / "instruct_test.json"),
        limit_records=20,
        batch_size=4,
        eval_batch_size=16,
    )
    dm.attach(easy_vqa_tokenizer, to_tensor, to_tensor, N_IMAGE)
    dm.setup("fit")
    dm.setup("test")
    train, test = next(iter(dm.train_dataloader())), next(iter(dm.test_dataloader()))
    assert train["images"].shape == (4, 3, 8, 8) and test["input_ids"].shape[0] == 16
    assert {t for types in test["question_types"] for t in types} <= {"yes/no", "color", "shape"}


def test_one_id_with_three_conversations_about_one_image_trains_all_three(write_llava, easy_vqa_tokenizer):
    """Repeated ids lose nothing: the three records stay on one side of the split, together, and a
    training epoch draws each once; nothing is skipped."""
    same = [
        record(0, n_turns=1) | {"conversations": record(k, n_turns=k + 1)["conversations"]} for k in range(3)
    ]
    path, images = write_llava(same + [record(i, n_turns=1) for i in range(1, 9)])
    trained = 0
    for seed in range(4):
        dm = make_dm(InstructionDataModule, path, images, easy_vqa_tokenizer, val_fraction=0.25, seed=seed)
        dm.setup("fit")
        train, val = dm.datasets["train"].records, dm.datasets["val"].records
        in_train, in_val = ([r.key for r in side if r.id == "r0"] for side in (train, val))
        assert sorted(in_train + in_val) == [("r0", 1), ("r0", 2), ("r0", 3)] and not (in_train and in_val)
        if in_train:
            trained += 1
            drawn = [key for batch in dm.train_dataloader() for key in batch["keys"]]
            assert sorted(drawn) == sorted(r.key for r in train) and len(set(drawn)) == len(drawn)
            assert [len(r.turns) for r in train if r.id == "r0"] == [1, 2, 3]
        assert dm.skip_report() == {}
    assert 0 < trained < 4  # the seeds put them on both sides


def test_a_blank_image_has_the_size_the_transform_gives() -> None:
    """A text-only record's zero image batches with real ones: its size is the transform's output
    size (open_clip's train and eval transforms; the 8x8 Resize above), never a fixed one."""
    tower = VisionTower("stgc-vit-tiny")
    size = tower.visual.image_size
    assert (
        output_size(tower.image_transform(True)) == output_size(tower.image_transform(False)) == tuple(size)
    )
    assert output_size(to_tensor) == (8, 8)
    with pytest.raises(ValueError, match="no resize or crop step"):
        output_size(lambda image: image)


def test_several_files_one_dataset_each_with_its_own_image_folder(tmp_path, easy_vqa_tokenizer):
    """Dataset i is file i of train_json/val_json/test_json, its images under image_folder[i]; a None
    val entry carves that dataset's val from its own train file."""
    import json

    from PIL import Image

    files = {}
    for name, colour in [("a", (255, 0, 0)), ("b", (0, 0, 255))]:
        (tmp_path / name).mkdir()
        for i in range(20):  # the same relative image paths in both folders
            Image.new("RGB", (8, 8), colour).save(tmp_path / name / f"r{i}.png")
        for split, ids in [("train", range(20)), ("val", range(3)), ("test", range(4))]:
            records = [record(i, n_turns=1) | {"id": f"{name}{split}{i}"} for i in ids]
            files[name, split] = tmp_path / f"{name}_{split}.json"
            files[name, split].write_text(json.dumps(records))
    dm = InstructionDataModule(
        train_json=[str(files["a", "train"]), str(files["b", "train"])],
        val_json=[None, str(files["b", "val"])],
        test_json=[str(files["a", "test"]), str(files["b", "test"])],
        image_folder=[str(tmp_path / "a"), str(tmp_path / "b")],
        val_fraction=0.25,
    )
    dm.attach(easy_vqa_tokenizer, to_tensor, to_tensor, N_IMAGE)
    dm.setup("fit")
    dm.setup("test")
    ids = {split: [r.id for r in dm.datasets[split].records] for split in ("train", "val", "test")}
    carved = [i for i in ids["val"] if i.startswith("atrain")]
    assert len(carved) == 5 and not set(carved) & set(ids["train"])
    assert sorted(ids["train"] + carved) == sorted(
        [f"atrain{i}" for i in range(20)] + [f"btrain{i}" for i in range(20)]
    )
    assert ids["val"][5:] == [f"bval{i}" for i in range(3)]
    assert ids["test"] == [f"atest{i}" for i in range(4)] + [f"btest{i}" for i in range(4)]
    image_of = {r.id[0]: r.image for r in dm.datasets["test"].records}
    assert image_of == {"a": str(tmp_path / "a" / "r3.png"), "b": str(tmp_path / "b" / "r3.png")}
    first_b = dm.datasets["test"][4]["image"]  # pixels from b's folder: blue
    assert first_b[2].mean() == 1 and first_b[0].mean() == 0
    with pytest.raises(ValueError, match="image_folder lists 3 entries for 2 train_json files"):
        InstructionDataModule(train_json=["x", "y"], image_folder=["p", "q", "r"])
    with pytest.raises(ValueError, match="test_json lists 1 entries for 2 train_json files"):
        InstructionDataModule(train_json=["x", "y"], image_folder="p", test_json="z")
    with pytest.raises(ValueError, match="only val_json takes null"):
        InstructionDataModule(train_json=["x", None], image_folder="p")
