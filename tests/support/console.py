"""The installed `stgc` console script, run as a user runs it, and the one fit + evaluations that
test_console and test_board share (conftest's `console_runs`)."""

import json
import subprocess
import sys
from pathlib import Path

from support.fit import ENV, ROOT, stage3_stgc

STGC = Path(sys.executable).parent / "stgc"  # the console script pip installed beside this python
RUN = "stage3_stgc"


def stgc(*args: str) -> subprocess.CompletedProcess:
    """Run the installed script from the repository root; nothing it prints may be an object's repr."""
    result = subprocess.run(
        [str(STGC), *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert "object at 0x" not in result.stdout + result.stderr, result.stderr[-2000:]
    return result


def repeated_id_test_file(data_dir: Path, path: Path) -> Path:
    """easy-vqa test records: the three questions about one image share one id ("same"), two others keep theirs."""
    records = json.loads((data_dir / "instruct_test.json").read_text())
    image = records[0]["image"]
    same = [r for r in records if r["image"] == image][:3]
    others = [r for r in records if r["image"] != image][:2]
    assert len(same) == 3
    path.write_text(json.dumps([{**r, "id": "same"} for r in same] + others))
    return path


def fit_and_evaluate(data_dir: Path, log_root: Path) -> dict:
    """`stgc fit` of stage III with STGC on a slice, then validate, test and predict of its last.ckpt,
    each through the console script; what the run folder holds after the fit is kept to compare."""
    test_json = repeated_id_test_file(data_dir, log_root / "test.json")
    args = [
        *stage3_stgc(data_dir, log_root, 1, "--trainer.limit_train_batches=3"),
        f"--data.init_args.test_json={test_json}",
    ]
    folder = log_root / "easy_vqa" / RUN
    results = {"fit": stgc("fit", *args)}
    assert results["fit"].returncode == 0, results["fit"].stderr[-3000:]
    after_fit = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}  # config, hparams, events
    checkpoint = f"--ckpt_path={folder / 'checkpoints' / 'last.ckpt'}"
    for subcommand in ("validate", "test", "predict"):
        results[subcommand] = stgc(subcommand, *args, checkpoint)
    return {"folder": folder, "results": results, "after_fit": after_fit, "test_json": test_json}
