"""scripts/gpu_check.py, on the CPU with a tiny model: it runs, and its figures say what they should."""

import json
import subprocess
import sys
from pathlib import Path

from support.fit import ENV

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_reports_syncs_ratios_and_cosine_error(easy_vqa_dir, tmp_path) -> None:
    out = tmp_path / "gpu_check.json"
    command = [
        sys.executable,
        "scripts/gpu_check.py",
        "--tiny",
        "--data",
        str(easy_vqa_dir),
        "--out",
        str(out),
    ]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(out.read_text())["bf16-mixed"]
    assert row["syncs_per_step"]["stgc"] - row["syncs_per_step"]["plain"] == 1  # STGC: one per step
    assert 0 < row["experts_share_s"] < 1 and row["floor_estimate"] == 1 + row["experts_share_s"] / 3
    assert row["floor"] > 0
    assert row["ratio"] > 0 and 0 <= row["cosine_max_abs_error_vs_fp64"] <= 5e-3
    assert row["ratio_output"] > 0 and row["ratio_logging"] > 0
    layers = json.loads(out.read_text())["operators_per_layer"]
    assert layers["qwen3_vl_moe_tiny_bf16"]["finite"] and layers["qwen3_vl_moe_tiny_bf16"]["hooks"] > 0
    assert layers["qwen3_moe_8_experts"]["after_backward"] > 0 and layers["sparse_moe_8_experts"]["hooks"] > 0
    qwen3 = layers["qwen3_moe_8_experts"]
    # the metrics are built on logging steps only
    assert qwen3["logging_after_backward"] > qwen3["after_backward"]
