"""The LVLM and its LightningModule: splice, parameter groups, upcycling from a checkpoint, round trip."""

import contextlib

import lightning as L
import pytest
import torch

from stgc.constants import IMAGE_TOKEN_ID
from stgc.model.metrics import VQAAccuracy, normalize_answer
from stgc.module import LVLMModule, parameter_groups
from stgc.moe import moe_layers
from support.conversations import multi_turn_easy_vqa
from support.tiny import TINY_LM


@pytest.fixture
def tiny_module(easy_vqa_dir):
    def build(**kwargs) -> LVLMModule:
        torch.manual_seed(0)
        defaults = dict(
            tokenizer=str(easy_vqa_dir / "tokenizer"), lm_config=TINY_LM, trainable=["projector", "lm"]
        )
        return LVLMModule(**(defaults | kwargs))

    return build


def _batch(module: LVLMModule, num_text: int = 5) -> dict[str, torch.Tensor]:
    p = module.num_image_tokens
    ids = torch.tensor([[7] * 2 + [IMAGE_TOKEN_ID] * p + [8] * num_text, [9] * (2 + p + num_text)])
    labels = ids.masked_fill(ids == IMAGE_TOKEN_ID, -100)
    return {
        "images": torch.randn(2, 3, 64, 64),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
    }


def test_image_patches_are_spliced_at_the_image_positions_in_order(tiny_module) -> None:
    module = tiny_module()
    batch = _batch(module)
    embeds, image_mask = module.model.embed(batch["images"], batch["input_ids"])
    patches = module.model.projector(module.model.vision_tower(batch["images"][:1]))[
        0
    ]  # only sample 0 has an image
    p = module.num_image_tokens
    torch.testing.assert_close(embeds[0, 2 : 2 + p], patches)
    text = module.model.language_model.get_input_embeddings()
    torch.testing.assert_close(embeds[1], text(batch["input_ids"][1]))
    torch.testing.assert_close(embeds[0, 2 + p :], text(torch.tensor([8] * 5)))
    assert image_mask.sum() == p and image_mask[0, 2 : 2 + p].all()


def test_cls_patch_keeps_the_cls_token_first(tiny_module) -> None:
    """LLaVA's "cls_patch": the CLS token of the chosen block, then its patch tokens."""
    patch = tiny_module(vision_feature_layer=-1)
    cls_patch = tiny_module(vision_feature_layer=-1, vision_select_feature="cls_patch")
    assert cls_patch.num_image_tokens == patch.num_image_tokens + 1 == 65
    cls_patch.model.vision_tower.load_state_dict(patch.model.vision_tower.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with_cls = cls_patch.model.vision_tower(images)
    torch.testing.assert_close(with_cls[:, 1:], patch.model.vision_tower(images))
    # independently: run the blocks by hand and take token 0 of the last block's output
    visual = cls_patch.model.vision_tower.visual
    x = visual.conv1(images).flatten(2).transpose(1, 2)  # (B, 64, width)
    x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.transformer(visual.ln_pre(x))
    torch.testing.assert_close(with_cls[:, 0], x[:, 0])
    with pytest.raises(ValueError, match="select_feature='cls'"):
        tiny_module(vision_select_feature="cls")


def test_token_pool_averages_each_cell_of_the_patch_grid(tiny_module) -> None:
    """vision_token_pool=2: the 8x8 patch grid becomes 4x4 tokens, each the mean of its 2x2 cell."""
    full = tiny_module()
    pooled = tiny_module(vision_token_pool=2, vision_select_feature="cls_patch")
    assert pooled.num_image_tokens == 4 * 4 + 1
    pooled.model.vision_tower.load_state_dict(full.model.vision_tower.state_dict())
    images = torch.randn(2, 3, 64, 64)
    patches = full.model.vision_tower(images).reshape(2, 8, 8, -1)  # row-major patch grid
    out = pooled.model.vision_tower(images)  # (2, 1 + 16, width): CLS first
    for row in range(4):
        for col in range(4):
            cell = patches[:, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2].mean(dim=(1, 2))
            torch.testing.assert_close(out[:, 1 + 4 * row + col], cell)
    with pytest.raises(ValueError, match="pool=3 must be >= 1 and divide the"):
        tiny_module(vision_token_pool=3)


def test_wrong_number_of_image_positions_is_a_clear_error(tiny_module) -> None:
    module = tiny_module()
    ids = torch.tensor([[IMAGE_TOKEN_ID] * 3 + [5]])
    expected = f"3 image positions for 1 images, expected {module.num_image_tokens} per image"
    with pytest.raises(ValueError, match=expected):
        module.model.embed(torch.randn(1, 3, 64, 64), ids)


def test_trainable_groups_freeze_everything_else(tiny_module) -> None:
    module = tiny_module(trainable=["projector"])
    groups = parameter_groups(module.model)
    assert all(p.requires_grad for p in groups["projector"])
    assert not any(p.requires_grad for p in groups["lm"] + groups["vision_tower"])
    with pytest.raises(ValueError, match=r"unknown groups \['decoder'\]"):
        tiny_module(trainable=["decoder"])
    with pytest.raises(ValueError, match="trainable group 'experts' has no parameters"):
        tiny_module(trainable=["experts"])


def test_dense_mlps_are_the_mlps_of_the_layers_without_experts(tiny_module) -> None:
    module = tiny_module(moe={"num_experts": 4, "top_k": 2}, trainable=["dense_mlps"])  # MoE in layer 0 of 2
    layers = module.model.language_model.model.layers
    groups = parameter_groups(module.model)
    assert {id(p) for p in groups["dense_mlps"]} == {id(p) for p in layers[1].mlp.parameters()}
    trained = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("language_model.model.layers.1.mlp.") for n in trained)


def _save(module: LVLMModule, path) -> str:
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_steps=0, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return str(path)


def test_stage3_upcycles_a_stage2_checkpoint_into_an_equivalent_moe(tiny_module, tmp_path) -> None:
    dense = tiny_module().eval()
    checkpoint = _save(dense, tmp_path / "stage2.ckpt")
    moe = tiny_module(
        moe={"num_experts": 4, "top_k": 2}, init_from=checkpoint, trainable=["experts", "routers"]
    ).eval()
    assert list(moe_layers(moe.model)) == ["language_model.model.layers.0.mlp"]  # every other of 2 layers
    batch = _batch(dense)
    with torch.no_grad():
        torch.testing.assert_close(moe(batch).logits, dense(batch).logits, atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in moe.named_parameters() if p.requires_grad}
    assert trainable and all(".experts." in n or ".router." in n for n in trainable)


def test_moe_checkpoint_round_trip_gives_identical_logits(tiny_module, tmp_path) -> None:
    moe = tiny_module(moe={"num_experts": 4, "top_k": 2}, trainable=["experts", "routers"]).eval()
    for parameter in moe_layers(moe.model)["language_model.model.layers.0.mlp"].router.parameters():
        torch.nn.init.normal_(parameter)  # make routing non-trivial
    checkpoint = _save(moe, tmp_path / "stage3.ckpt")
    restored = LVLMModule.load_from_checkpoint(checkpoint, init_from=None).eval()
    fresh = tiny_module(
        moe={"num_experts": 4, "top_k": 2}, init_from=checkpoint, trainable=["experts"]
    ).eval()
    batch = _batch(moe)
    with torch.no_grad():
        expected = moe(batch).logits
        torch.testing.assert_close(restored(batch).logits, expected, atol=0, rtol=0)
        torch.testing.assert_close(fresh(batch).logits, expected, atol=0, rtol=0)


def test_moe_checkpoint_needs_moe_settings(tiny_module, tmp_path) -> None:
    checkpoint = _save(
        tiny_module(moe={"num_experts": 2, "top_k": 1}, trainable=["experts"]), tmp_path / "m.ckpt"
    )
    with pytest.raises(ValueError, match="holds an MoE model; set `moe`"):
        tiny_module(init_from=checkpoint)


def test_greedy_generation_returns_new_tokens_only(tiny_module) -> None:
    module = tiny_module().eval()
    batch = _batch(module)
    prompt = {
        "images": batch["images"],
        "prompt_input_ids": batch["input_ids"],
        "prompt_attention_mask": batch["attention_mask"],
    }
    new_ids = module.model.generate(
        batch["images"], batch["input_ids"], batch["attention_mask"], 3, eos_token_id=-1, pad_token_id=0
    )
    assert new_ids.shape == (2, 3)
    logits = module(batch | {"labels": None}).logits
    assert torch.equal(new_ids[:, 0], logits[:, -1].argmax(-1))  # the first greedy token
    assert len(module.answer(prompt)) == 2


def test_vqa_accuracy_normalises_and_splits_by_type() -> None:
    assert normalize_answer("  The Blue!  ") == "blue"
    metric = VQAAccuracy(["yes/no", "color", "shape"])
    metric.update(
        ["Yes", "red", "circle.", "a cat"],
        ["yes", "blue", "Circle", "cat"],
        ["yes/no", "color", "shape", "misc"],
    )
    result = metric.compute()
    assert result["overall"] == 0.75
    assert (result["yes_no"], result["color"], result["shape"], result["other"]) == (1.0, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="2 predictions, 1 targets"):
        metric.update(["a", "b"], ["a"], ["other"])


class InjectNaN(LVLMModule):
    """Returns a NaN loss at one step (a stand-in for an overflow deep in a long run)."""

    nan_step = 1

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.nan_step else loss


class WeightsPerStep(L.Callback):
    """The trained weights before every step, and after the last."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def _snapshot(self, pl_module) -> torch.Tensor:
        return torch.cat([p.detach().flatten().clone() for p in pl_module.parameters() if p.requires_grad])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.weights.append(self._snapshot(pl_module))

    def on_train_end(self, trainer, pl_module) -> None:
        self.weights.append(self._snapshot(pl_module))


def test_non_finite_loss_and_empty_batch_skip_their_steps_and_training_goes_on(easy_vqa_dir) -> None:
    """Step 1's loss is NaN and step 3's batch had only bad records: both steps leave every weight
    and the optimizer state alone; the skips are counted and logged; the other steps train."""
    torch.manual_seed(0)
    module = InjectNaN(
        tokenizer=str(easy_vqa_dir / "tokenizer"), lm_config=TINY_LM, trainable=["projector", "lm"]
    )
    batches = [_batch(module)] * 3 + [{"skipped": [("r9", "bad_image")]}, _batch(module)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)
    weights = WeightsPerStep()
    trainer = L.Trainer(
        max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[weights],
    )  # fmt: skip
    trainer.fit(module, loader)
    changed = [
        not torch.equal(before, after)
        for before, after in zip(weights.weights, weights.weights[1:], strict=False)
    ]
    assert changed == [True, False, True, False, True]
    assert module.skipped_steps == 2 and trainer.callback_metrics["train/skipped_steps"] == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert trainer.optimizers[0].state[next(p for p in module.parameters() if p.requires_grad)]["step"] == 3


def test_teacher_forced_scoring_gives_exactly_the_generated_answers(easy_vqa_dir, tmp_path) -> None:
    """The VQA metric's one-forward-per-conversation scoring returns, answer for answer, the text
    that greedy generation from each answer's own prompt returns (the predict path), on a briefly
    trained model that gets some answers right and some wrong, on multi-turn conversations."""
    from stgc.data import InstructionDataModule

    torch.manual_seed(0)
    module = LVLMModule(
        tokenizer=str(easy_vqa_dir / "tokenizer"), lm_config=TINY_LM, trainable=["projector", "lm"], lr=3e-3
    )
    data = InstructionDataModule(
        train_json=str(multi_turn_easy_vqa(easy_vqa_dir, tmp_path / "conversations.json", images=24)),
        image_folder=str(easy_vqa_dir / "images"),
        val_fraction=0.125,  # 3 conversations, about 30 answers: each generated twice
        max_length=400,
        batch_size=6,
        eval_batch_size=4,
    )
    trainer = L.Trainer(
        max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, data)
    assert all(len(r.turns) > 1 for r in data.datasets["val"].records)
    module.eval()
    targets = [t.answer for r in data.datasets["val"].records for t in r.turns]
    generate = module._generate_from
    for precision in (contextlib.nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16)):
        generated_for = []
        module._generate_from = lambda p, i, seen=generated_for: seen.extend(p) or generate(p, i)
        with torch.no_grad(), precision:  # bf16: near-ties of the argmax are generated, not read
            scored = [
                text
                for batch in data.val_dataloader()
                for text in module.score_answers(batch, module(batch).logits)
            ]
            generated = [text for batch in data.answer_loader("val") for text in module.answer(batch)]
        assert scored == generated
        right = sum(s == t for s, t in zip(scored, targets, strict=True))
        assert 0 < right < len(targets) and 0 < len(generated_for) < len(targets)
