"""The mixed pipeline (configs/mix/, `make train-mix`) on a slice: stages 0 -> I -> warm-up -> II -> III
on easy-vqa + Sort-of-CLEVR + its text-only family, through the pipeline's fit_stage with its links,
one tokenizer for both datasets (scripts/prepare_mix.py), accuracy per question family."""

import json
import runpy
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from stgc.sort_of_clevr.prepare import QUESTION_TYPES, prepare
from stgc_experiments import pipeline as stages
from support.tiny import TINY_LM

pytestmark = pytest.mark.slow  # every mix stage: test_cli runs the same stages on easy-vqa

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["yes_no", "color", "shape", *QUESTION_TYPES]  # as the logged keys spell them
MIX_STAGES = ["stage0", "stage1", "stage2_text", "stage2", "stage3_stgc"]


@pytest.fixture(scope="module")
def data(easy_vqa_dir, tmp_path_factory) -> dict[str, Path]:
    """easy-vqa, a small Sort-of-CLEVR and the mix tokenizer trained on both by prepare_mix.py."""
    soc = prepare(tmp_path_factory.mktemp("sort_of_clevr"), seed=0, splits={"train": 24, "val": 4, "test": 4})
    tokenizer = tmp_path_factory.mktemp("mix") / "tokenizer"
    argv = ["prepare_mix.py", str(easy_vqa_dir), str(soc), "--out", str(tokenizer)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", argv)
        runpy.run_path(str(ROOT / "scripts" / "prepare_mix.py"), run_name="__main__")
    return {"data/easy_vqa": easy_vqa_dir, "data/sort_of_clevr": soc, "data/mix/tokenizer": tokenizer}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def moved(path: str | None, data: dict[str, Path]) -> str | None:
    """A config's data/... path in the test's folders."""
    for prefix, folder in data.items():
        if path is not None and path.startswith(prefix):
            return str(folder / Path(path).relative_to(prefix))
    return path


def slice_args(stage: str, data: dict[str, Path]) -> list[str]:
    """The stage's own file lists, moved to the test's folders, with a tiny LM and budget."""
    files = stages.stage_data_args(stage, pipeline="mix")
    lists = {
        key: [moved(p, data) for p in files[key]]
        for key in ("train_json", "val_json", "test_json", "image_folder")
    }
    lm = [] if stage == "stage0" else [f"--model.init_args.lm_config={json.dumps(TINY_LM)}"]
    return [
        f"--model.init_args.tokenizer={data['data/mix/tokenizer']}",
        *lm,
        *[f"--data.init_args.{key}={json.dumps(value)}" for key, value in lists.items()],
        "--data.init_args.limit_records=40",  # of each file
        "--data.init_args.val_fraction=0.3",
        "--data.init_args.batch_size=8",
        "--data.init_args.eval_batch_size=16",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.log_every_n_steps=1",
    ]


@pytest.fixture(scope="module")
def pipeline(data, tmp_path_factory, monkeypatch_module):
    """The mix stages in order through fit_stage, stage III with STGC (its baseline arm differs only by a
    config file, which test_cli's easy-vqa pipeline runs); returns the log root and each stage's CLI."""
    log_root = tmp_path_factory.mktemp("logs")
    monkeypatch_module.chdir(log_root)  # not the repository root: the pipeline runs `stgc` there itself
    clis = {}
    for stage in MIX_STAGES:
        previous = stages.source(stage, pipeline="mix")
        clis[stage] = stages.fit_stage(stage, log_root, previous, slice_args(stage, data), pipeline="mix")
    return log_root, clis


def test_every_stage_finishes_from_the_one_before(pipeline):
    log_root, _ = pipeline
    for stage in MIX_STAGES:
        assert stages.stage_record(log_root, stage, pipeline="mix")["finished"], stage
    assert (log_root / "mix" / "stage0" / "clip.pt").is_file()
    for before, stage in (("stage1", "stage2_text"), ("stage2_text", "stage2"), ("stage2", "stage3_stgc")):
        trained = OmegaConf.load(log_root / "mix" / stage / "config.yaml").model.init_args
        assert trained.init_from == str(log_root / "mix" / before / "checkpoints" / "last.ckpt")
        assert "configs/mix/model.yaml" in stages.stage_args(stage, log_root, pipeline="mix")
    assert (
        OmegaConf.load(ROOT / "configs" / "mix" / "model.yaml").model.init_args.tokenizer
        == "data/mix/tokenizer"
    )


def test_stages_train_on_every_dataset_and_score_every_family(pipeline, data):
    log_root, clis = pipeline
    train = clis["stage3_stgc"].datamodule.datasets["train"].records
    datasets = {str(data["data/easy_vqa"]): 0, str(data["data/sort_of_clevr"]): 0, None: 0}
    for record in train:  # an image of each dataset, and the text-only family
        datasets[next((d for d in datasets if d and record.image and record.image.startswith(d)), None)] += 1
    assert all(datasets.values()), datasets
    val = stages.stage_record(log_root, "stage3_stgc", pipeline="mix")["val"]
    assert {f"val/vqa_acc_{family}" for family in FAMILIES} <= set(val)
    args = slice_args("stage3_stgc", data)
    tested = stages.test_stage("stage3_stgc", log_root, args, pipeline="mix").trainer.callback_metrics
    assert {"test/vqa_acc", "test/vqa_acc_text_only", "test/vqa_acc_yes_no"} <= set(tested)


def test_the_mix_tokenizer_covers_both_datasets(data):
    tokenizer = AutoTokenizer.from_pretrained(data["data/mix/tokenizer"])
    for folder in (data["data/easy_vqa"], data["data/sort_of_clevr"]):
        for record in json.loads((folder / "instruct_text_test.json").read_text())[:50]:
            for turn in record["conversations"]:
                assert tokenizer.unk_token_id not in tokenizer(" " + turn["value"])["input_ids"]
