"""`stgc fit` in a subprocess, as a user runs it: stage III with STGC on a slice of easy-vqa."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from support.tiny import TINY_LM

ROOT = Path(__file__).resolve().parents[2]
ENV = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), "HF_HUB_OFFLINE": "1"}


def stage3_stgc(data_dir: Path, log_root: Path, epochs: int, *extra: str) -> list[str]:
    """Arguments of `stgc fit` for stage III with STGC (untrained tiny LVLM) on 36 records (4 images)."""
    configs = [
        "-c", "configs/trainer.yaml", "-c", "configs/easy_vqa/model.yaml",
        "-c", "configs/easy_vqa/stage3_moe.yaml", "-c", "configs/easy_vqa/stage3_moe_stgc.yaml",
    ]  # fmt: skip
    return [
        *configs,
        "--model.init_args.init_from=null", f"--model.init_args.lm_config={json.dumps(TINY_LM)}",
        f"--model.init_args.tokenizer={data_dir / 'tokenizer'}",
        f"--data.init_args.train_json={data_dir / 'instruct_train.json'}",
        f"--data.init_args.image_folder={data_dir / 'images'}",
        "--data.init_args.limit_records=36", "--data.init_args.val_fraction=0.2",
        "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=8",
        f"--trainer.max_epochs={epochs}", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
        "--trainer.callbacks.threshold=0.0",  # the tiny model's cosines: some conflicts at τ = 0
        f"--trainer.logger.init_args.save_dir={log_root}", *extra,
    ]  # fmt: skip


def fit_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "stgc", "fit", *args]


def run(args: list[str]) -> subprocess.CompletedProcess:
    """Run a command from the repository root; it must succeed."""
    result = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_until_stalled(args: list[str], marker: Path) -> None:
    """Start the command, wait until it reports the stall point (support.faults), SIGKILL it."""
    process = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert process.poll() is None, f"the run ended before the stall: {process.stderr.read()[-3000:]!r}"
        assert time.monotonic() < deadline, "the run did not reach the stall point"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
