"""What STGC shows in TensorBoard: the custom-scalars layout read back from a real fit's event file,
no placeholder hp_metric, and the conflict picture of a real tiny easy-vqa model."""

import re

import lightning as L
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

from stgc.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from stgc.data import InstructionDataModule
from stgc.module import LVLMModule
from stgc.moe import moe_losses
from stgc.report.figures import shade, token_grid
from stgc.report.layout import OVERVIEW, custom_scalars_layout
from support.tiny import TINY_LM

NUM_EXPERTS = 4  # configs/easy_vqa/stage3_moe.yaml


@pytest.fixture(scope="module")
def fit_events(console_runs) -> EventAccumulator:
    """The event file of `stgc fit`, stage III with STGC on a slice, through the installed script."""
    return EventAccumulator(str(console_runs["folder"])).Reload()


def _layout(events: EventAccumulator) -> dict[str, dict[str, list[str]]]:
    """category -> chart title -> the chart's regexes, as TensorBoard's custom-scalars plugin reads them."""
    (config,) = events.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    return {c.title: {chart.title: list(chart.multiline.tag) for chart in c.chart} for c in layout.category}


def test_layout_groups_the_logged_charts_per_layer_with_a_line_per_expert(fit_events) -> None:
    layout = _layout(fit_events)
    assert list(layout) == [OVERVIEW, "layer_0"]  # STGC's overview first; the tiny LM's one MoE layer
    names = set(fit_events.Tags()["scalars"])
    for category, charts in layout.items():
        for title, regexes in charts.items():
            lines = {name for name in names if any(re.search(regex, name) for regex in regexes)}
            assert lines, f"{category} / {title}: {regexes} match no metric"
            if category == "layer_0":
                assert all("layer_0" in name.split("/") for name in lines), (title, sorted(lines))
            elif "per layer" not in title:  # the overview: the figures over all layers
                assert not any("layer_0" in name.split("/") for name in lines), (title, sorted(lines))
            if "per expert" in title:
                assert len(lines) == NUM_EXPERTS, (title, sorted(lines))
    assert list(layout["layer_0"])[0] == "conflict ratio: all, text, image tokens"  # STGC's charts first
    shown = {
        name
        for charts in layout.values()
        for regexes in charts.values()
        for name in names
        if any(re.search(r, name) for r in regexes)
    }
    routing = {name for name in names if name.startswith(("stgc/", "moe/"))}
    assert routing <= shown, sorted(routing - shown)  # every routing and conflict metric has its chart
    cosine = layout["layer_0"]["cosine mean and its null level"]
    assert {n for n in names if any(re.search(r, n) for r in cosine)} == {
        "stgc/cosine_mean/layer_0",
        "stgc/cosine_null/layer_0",
    }


def test_a_run_without_stgc_adds_no_chart_to_the_stgc_layout() -> None:
    """A folder mixing runs with and without the callback shows each chart once, in the merged layout."""
    layers = ["layer_1", "layer_3"]
    baseline, with_stgc = custom_scalars_layout(layers, stgc=False), custom_scalars_layout(layers, stgc=True)
    assert list(baseline) == layers and list(with_stgc) == [OVERVIEW, *layers]
    for layer in layers:
        assert baseline[layer].items() <= with_stgc[layer].items()
    assert all(
        "stgc/" not in regex
        for charts in baseline.values()
        for _, regexes in charts.values()
        for regex in regexes
    )


def test_the_fit_logs_the_conflict_picture_of_its_fixed_sample(fit_events) -> None:
    """The STGC callback draws it through LVLMModule's conflict_picture methods on histogram steps."""
    (picture,) = fit_events.Images("stgc/conflict_picture")  # step 0 of 3, histogram_every_n_steps=50
    assert picture.step == 0 and picture.width > picture.height > 300


def test_no_placeholder_hp_metric(fit_events) -> None:
    """configs/trainer.yaml turns TensorBoardLogger's default_hp_metric off (the stage files keep it)."""
    scalars = fit_events.Tags()["scalars"]
    assert "train/loss" in scalars and "hp_metric" not in scalars


def test_each_pixel_is_shaded_by_the_token_of_its_pooled_patch() -> None:
    """A 64 x 64 image in 8 x 8 patches of 8 pixels, pooled 2 x 2 into 16 tokens (CLS first or not):
    every pixel against the share of the token its patch went into, one pixel at a time."""
    rng = np.random.default_rng(0)
    image = rng.random((64, 64, 3))
    luma = image @ np.array([0.299, 0.587, 0.114])  # (64, 64)
    grey = 0.3 + 0.7 * (luma - luma.min()) / (luma.max() - luma.min())
    for keep_cls in (False, True):
        shares = rng.random(int(keep_cls) + 16)
        shaded = shade(image, token_grid(shares, (8, 8), pool=2, keep_cls=keep_cls))
        for y, x in np.ndindex(64, 64):
            token = int(keep_cls) + (y // 8 // 2) * 4 + x // 8 // 2
            colour = np.array(plt.get_cmap("Reds")(shares[token])[:3])
            expected = (1 - 0.85 * shares[token]) * grey[y, x] + 0.85 * shares[token] * colour
            np.testing.assert_allclose(shaded[y, x], expected, rtol=1e-6)


def test_shade_leaves_share_zero_and_nan_grey() -> None:
    image = np.random.default_rng(0).random((8, 8, 3))
    shaded = shade(image, np.array([[0.0, 1.0], [np.nan, 0.5]]))
    for cell in (shaded[:4, :4], shaded[4:, :4]):  # share 0 and NaN: the image in grey
        np.testing.assert_allclose(cell[..., 0], cell[..., 1])
        np.testing.assert_allclose(cell[..., 1], cell[..., 2])
    red = shaded[:4, 4:]
    assert (red[..., 0] > red[..., 1] + 0.3).all()  # share 1: red


@pytest.fixture(scope="module")
def picture_run(easy_vqa_dir):
    """A tiny stage III model (pooled 2x2 image tokens) after one real training step, with what its
    conflict-picture methods return then."""
    torch.manual_seed(0)
    module = LVLMModule(
        tokenizer=str(easy_vqa_dir / "tokenizer"), lm_config=TINY_LM, vision_token_pool=2,
        moe={"num_experts": 4, "top_k": 2, "layers": "every_other"}, trainable=["experts", "routers"],
    )  # fmt: skip
    datamodule = InstructionDataModule(
        train_json=str(easy_vqa_dir / "instruct_train.json"), image_folder=str(easy_vqa_dir / "images"),
        limit_records=40, val_fraction=0.3, batch_size=4, system_prompt="",
    )  # fmt: skip
    seen = {}

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seen["first"] = trainer.datamodule.conflict_picture_sample()
            seen["second"] = trainer.datamodule.conflict_picture_sample()

    trainer = L.Trainer(
        max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Capture()],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return module, datamodule, seen


def test_picture_sample_is_the_first_val_record_with_an_image_and_stays_fixed(picture_run) -> None:
    module, datamodule, seen = picture_run
    sample = seen["first"]
    assert seen["second"] is sample and datamodule.conflict_picture_sample() is sample
    first = next(record for record in datamodule.datasets["val"].records if record.image is not None)
    assert sample["keys"] == [first.key] and sample["images"].shape == (1, 3, 64, 64)
    assert (sample["input_ids"] == IMAGE_TOKEN_ID).sum() == module.num_image_tokens == 16
    assert (sample["labels"] != IGNORE_INDEX).any()  # a training sample: the answers are trained
    assert sample["input_ids"].device.type == "cpu"  # the callback moves it to the module's device


def test_picture_loss_is_the_training_objective(picture_run) -> None:
    module, _, seen = picture_run
    sample = seen["first"]
    loss = module.conflict_picture_loss(sample)
    logits = module(sample).logits[0, :-1]  # (T-1, V)
    lm_loss = torch.nn.functional.cross_entropy(logits, sample["labels"][0, 1:], ignore_index=IGNORE_INDEX)
    aux_loss, _ = moe_losses(module.model)
    torch.testing.assert_close(loss, lm_loss + module.hparams.router_aux_loss_coef * aux_loss)
    assert loss.requires_grad


def _changed(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int]:
    """The (top, bottom, left, right) pixel box where two pictures differ."""
    rows, columns = np.nonzero((a != b).any(axis=-1))
    return rows.min(), rows.max(), columns.min(), columns.max()


def test_picture_shades_the_patches_of_a_conflicting_image_token(picture_run) -> None:
    module, _, seen = picture_run
    sample = seen["first"]
    is_image = sample["input_ids"][0] == IMAGE_TOKEN_ID  # (T,)
    zero = torch.where(is_image, 0.0, torch.nan)  # (T,) every image token at share 0, text: none
    image_positions = is_image.nonzero().squeeze(1)
    base = module.conflict_picture(sample, zero)
    assert base.dtype == np.uint8 and base.ndim == 3 and base.shape[-1] == 3
    top, bottom, left, right = _changed(
        base, module.conflict_picture(sample, torch.where(is_image, 1.0, zero))
    )
    cell = ((bottom - top + 1) / 4, (right - left + 1) / 4)  # the 4 x 4 pooled tokens over the panel
    for token, (row, column) in {5: (1, 1), 14: (3, 2)}.items():  # token k covers cell (k // 4, k % 4)
        one = zero.clone()
        one[image_positions[token]] = 1.0
        box = _changed(base, module.conflict_picture(sample, one))
        expected = (
            top + row * cell[0],
            top + (row + 1) * cell[0] - 1,
            left + column * cell[1],
            left + (column + 1) * cell[1] - 1,
        )
        np.testing.assert_allclose(box, expected, atol=2)
    text = torch.where(is_image, 0.0, 1.0)  # now every text token at share 1
    text_top = _changed(base, module.conflict_picture(sample, text))[0]
    assert text_top > bottom  # the text boxes lie below the image


def test_picture_needs_one_share_per_position_and_one_image(picture_run) -> None:
    module, _, seen = picture_run
    with pytest.raises(ValueError, match=r"token_share has shape \(3,\)"):
        module.conflict_picture(seen["first"], torch.zeros(3))
    text_only = seen["first"] | {"input_ids": seen["first"]["input_ids"].clamp(min=0)}
    with pytest.raises(ValueError, match="has 0 image positions"):
        module.conflict_picture(text_only, torch.zeros(text_only["input_ids"].shape[1]))
