"""stgc_experiments.study: the paired interval and the expert load per question family, against brute force."""

import numpy as np
import pytest
import torch

from stgc.constants import IGNORE_INDEX
from stgc.data import InstructionDataModule
from stgc.model.metrics import metric_name
from stgc.module import LVLMModule
from stgc.moe import moe_layers, short_layer_name
from stgc_experiments.study import expert_load_by_family, paired_interval, student_t_quantile
from support.conversations import multi_turn_easy_vqa
from support.tiny import TINY_LM


def test_student_t_quantile_matches_the_closed_forms() -> None:
    for p in (0.9, 0.975):
        assert np.isclose(student_t_quantile(p, 1), np.tan(np.pi * (p - 0.5)), rtol=1e-6)  # Cauchy
        a = 2 * p - 1
        assert np.isclose(student_t_quantile(p, 2), a * np.sqrt(2 / (1 - a**2)), rtol=1e-6)
    assert np.isclose(student_t_quantile(0.975, 200), 1.97, atol=0.005)  # towards the normal's 1.96


def test_paired_interval_is_the_mean_over_seeds_and_holds_the_seeds_spread() -> None:
    rng = np.random.default_rng(0)
    baseline = rng.random((3, 500)) < 0.7  # (seeds, questions)
    arm = rng.random((3, 500)) < 0.8
    result = paired_interval(baseline.tolist(), arm.tolist())
    assert np.isclose(result["mean"], arm.mean() - baseline.mean()) and result["seeds"] == 3
    per_seed = arm.mean(axis=1) - baseline.mean(axis=1)
    half = 4.302653 * per_seed.std(ddof=1) / np.sqrt(3)  # t(0.975, 2), from a table
    assert np.isclose(result["high"] - result["mean"], half) and np.isclose(
        result["mean"] - result["low"], half
    )
    # seeds that disagree (+0.1, +0.1, -0.1 on every question): the interval spans the seeds, while a
    # bootstrap over questions alone would be a point (every question's mean difference is +1/30)
    base = np.zeros((3, 200), dtype=bool)
    other = np.zeros((3, 200), dtype=bool)
    other[:2, :20] = True
    base[2, :20] = True
    spread = paired_interval(base.tolist(), other.tolist())
    assert spread["low"] < 0 < spread["mean"] < spread["high"]
    # one seed: its questions' bootstrap, about ±1.96 standard errors
    one = paired_interval(baseline[:1].tolist(), arm[:1].tolist())
    error = np.sqrt((arm[0].astype(float) - baseline[0]).var() / 500)
    assert one["seeds"] == 1 and abs((one["high"] - one["low"]) / (2 * 1.96 * error) - 1) < 0.15
    same = paired_interval(baseline.tolist(), baseline.tolist())
    assert (same["mean"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        paired_interval([], [])
    with pytest.raises(ValueError, match="same examples"):
        paired_interval([[True, False]], [[True]])


def test_expert_load_by_family_counts_the_slots_of_each_answers_producing_tokens(
    easy_vqa_dir, tmp_path
) -> None:
    """Per layer and question type, the experts' shares of the top-k slots of the tokens whose next
    token is one of that type's answer tokens, recounted token by token from the routing records."""
    torch.manual_seed(0)
    module = LVLMModule(
        tokenizer=str(easy_vqa_dir / "tokenizer"), lm_config=TINY_LM, trainable=["experts", "routers"],
        moe={"num_experts": 4, "top_k": 2},
    )  # fmt: skip
    for layer in moe_layers(module.model).values():  # a random router: the experts' loads differ
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    data = InstructionDataModule(
        train_json=str(multi_turn_easy_vqa(easy_vqa_dir, tmp_path / "conversations.json", images=12)),
        image_folder=str(easy_vqa_dir / "images"), val_fraction=0.5, eval_batch_size=3,
    )  # fmt: skip
    data.attach(
        module.tokenizer, module.image_transform(True), module.image_transform(False), module.num_image_tokens
    )
    data.setup("validate")
    batches = list(data.val_dataloader())
    loads = expert_load_by_family(module, batches)

    expected: dict[str, dict[str, np.ndarray]] = {}
    for batch in batches:
        module(batch)
        labels, length = batch["labels"], batch["labels"].shape[1]
        for name, layer in moe_layers(module.model).items():
            record = layer.last_routing
            slot_of = {int(t): record.topk_index[n].tolist() for n, t in enumerate(record.token_index)}
            for row, types in enumerate(batch["question_types"]):
                answer, previous = -1, False
                for position in range(length - 1):  # the hidden state at `position` predicts position + 1
                    trained = bool(labels[row, position + 1] != IGNORE_INDEX)
                    answer += trained and not previous  # a new run of trained targets: the next answer
                    previous = trained
                    if trained and answer < len(types):
                        counts = expected.setdefault(short_layer_name(name), {}).setdefault(
                            metric_name(types[answer]), np.zeros(4)
                        )
                        for expert in slot_of[row * length + position]:
                            counts[expert] += 1
    assert loads.keys() == expected.keys() == {"layer_0"}  # the tiny LM: experts in its first layer of two
    for layer, per_type in expected.items():
        assert sorted(loads[layer]) == sorted(per_type) == ["color", "shape", "yes_no"]
        for question_type, counts in per_type.items():
            np.testing.assert_allclose(loads[layer][question_type], counts / counts.sum(), atol=1e-6)
    assert any(not np.allclose(loads[layer]["color"], loads[layer]["shape"]) for layer in loads)


def test_layer_of_reads_the_layer_of_a_per_layer_name_only() -> None:
    from stgc.method import names

    assert names.layer_of(names.metric(names.CONFLICT_RATIO, "layer_1"), names.CONFLICT_RATIO) == "layer_1"
    assert names.layer_of(names.metric(names.CONFLICT_RATIO), names.CONFLICT_RATIO) is None  # all layers
    assert names.layer_of(names.metric(names.CONFLICT_RATIO_TEXT, "layer_1"), names.CONFLICT_RATIO) is None
    assert names.layer_of(names.metric(names.EXPERT_LOAD, "layer_1", 0), names.EXPERT_LOAD) is None
