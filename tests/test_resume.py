"""Resume after SIGKILL through the CLI: training continues exactly where the last checkpoint left it,
and a kill while a checkpoint is being written never leaves one that fails to load."""

import json
from pathlib import Path

import pytest
import torch

from support.fit import fit_command, run, run_until_stalled, stage3_stgc

# SIGKILL and resume through `stgc fit`, three runs; test_pipeline resumes through make train's script
pytestmark = pytest.mark.slow

EPOCHS = 3


def checkpoints(log_root: Path) -> Path:
    return log_root / "easy_vqa" / "stage3_stgc" / "checkpoints"


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(easy_vqa_dir, tmp_path_factory) -> dict:
    log_root = tmp_path_factory.mktemp("uninterrupted")
    run(fit_command(stage3_stgc(easy_vqa_dir, log_root, EPOCHS)))
    return load(checkpoints(log_root) / "last.ckpt")


def assert_same_training_state(resumed: dict, reference: dict) -> None:
    assert (
        resumed["global_step"] == reference["global_step"]
        and resumed["epoch"] == reference["epoch"] == EPOCHS - 1
    )
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    for (_, a), (_, b) in zip(
        sorted(resumed["optimizer_states"][0]["state"].items()),
        sorted(reference["optimizer_states"][0]["state"].items()),
        strict=True,
    ):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=0, atol=1e-9)
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]
    stgc_state = next(k for k in reference["callbacks"] if k.startswith("STGC"))
    for key, value in reference["callbacks"][stgc_state].items():
        assert torch.equal(torch.as_tensor(resumed["callbacks"][stgc_state][key]), torch.as_tensor(value)), (
            key
        )
    assert reference["callbacks"][stgc_state]["measured_micro_batches"] == reference["global_step"]


def test_killed_run_resumes_where_its_last_checkpoint_left_off(easy_vqa_dir, tmp_path, uninterrupted) -> None:
    marker = tmp_path / "stalled"
    stall = [
        "--trainer.callbacks+=support.faults.StallAtEpoch",
        "--trainer.callbacks.epoch=2",
        f"--trainer.callbacks.marker={marker}",
    ]
    run_until_stalled(fit_command(stage3_stgc(easy_vqa_dir, tmp_path, EPOCHS, *stall)), marker)
    saved = load(checkpoints(tmp_path) / "last.ckpt")
    assert saved["epoch"] == 1 and 0 < saved["global_step"] < uninterrupted["global_step"]
    run(fit_command(stage3_stgc(easy_vqa_dir, tmp_path, EPOCHS, "--ckpt_path=last")))
    assert_same_training_state(load(checkpoints(tmp_path) / "last.ckpt"), uninterrupted)


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one_loadable(
    easy_vqa_dir, tmp_path, uninterrupted
) -> None:
    marker = tmp_path / "writing"
    stalling_io = json.dumps(
        [
            {
                "class_path": "support.faults.StallingCheckpointIO",
                "init_args": {"stall_at": 3, "marker": str(marker)},
            }
        ]
    )  # checkpoints 1-2: epoch 0's best and last; number 3 is torn
    run_until_stalled(
        fit_command(stage3_stgc(easy_vqa_dir, tmp_path, EPOCHS, f"--trainer.plugins={stalling_io}")), marker
    )
    files = sorted(p.name for p in checkpoints(tmp_path).iterdir())
    assert [name for name in files if not name.startswith(".")] == ["best.ckpt", "last.ckpt"]
    assert all(load(checkpoints(tmp_path) / name)["epoch"] == 0 for name in ("best.ckpt", "last.ckpt"))
    run(fit_command(stage3_stgc(easy_vqa_dir, tmp_path, EPOCHS, "--ckpt_path=last")))
    assert_same_training_state(load(checkpoints(tmp_path) / "last.ckpt"), uninterrupted)
