"""stgc.study: the paired bootstrap and the expert load per question family, against brute force."""

import numpy as np
import pytest
import torch

from stgc.constants import IGNORE_INDEX
from stgc.data import InstructionDataModule
from stgc.model.metrics import metric_name
from stgc.module import LVLMModule
from stgc.moe import moe_layers, short_layer_name
from stgc.study import expert_load_by_family, paired_bootstrap
from support.conversations import multi_turn_easy_vqa
from support.tiny import TINY_LM


def test_paired_bootstrap_difference_is_the_mean_over_seeds_and_questions() -> None:
    rng = np.random.default_rng(0)
    baseline = rng.random((3, 500)) < 0.7  # (seeds, questions)
    arm = rng.random((3, 500)) < 0.8
    result = paired_bootstrap(baseline.tolist(), arm.tolist())
    assert np.isclose(result["difference"], arm.mean() - baseline.mean())
    assert result["low"] < result["difference"] < result["high"]
    assert 0.02 < result["low"] and result["high"] < 0.18  # 0.1 apart, ~0.016 standard error
    same = paired_bootstrap(baseline.tolist(), baseline.tolist())
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}
    with pytest.raises(ValueError, match="at least one seed"):
        paired_bootstrap([], [])


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
