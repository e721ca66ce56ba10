"""configs/moe_llava/: every stage of the MoE-LLaVA recipe, run for a few steps with tiny stand-ins of
its architectures (a StableLM built from a tiny config and saved with save_pretrained, a tiny QuickGELU
open_clip ViT with 14-pixel patches saved as a checkpoint file); only paths and sizes are overridden."""

import json
import re
from pathlib import Path

import open_clip
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from stgc.cli import run as stgc
from support.chat_templates import save_chat_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "moe_llava"
LM_TYPE = "stablelm"  # the recipe's default LM: StableLM-2-1.6B (configs/moe_llava/model.yaml)
TINY_VIT = "stgc-test-vit-quickgelu"  # ViT-L-14-336-quickgelu's family at a tiny size
TINY_VIT_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 56, "layers": 3, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 16, "vocab_size": 512, "width": 32, "heads": 2, "layers": 1},
}
STAGES = {  # stage -> (its config files, the data its records come from)
    "stage1": (["stage1_pretrain.yaml"], "pretrain"),
    "stage2": (["stage2_finetune.yaml"], "instruct"),
    "stage3": (["stage3_moe.yaml"], "instruct"),
    "stage3_stgc": (["stage3_moe.yaml", "stage3_moe_stgc.yaml"], "instruct"),
}


def save_tiny_lm(model_type: str, tokenizer_dir: Path, path: Path) -> Path:
    """A randomly initialised tiny causal LM of `model_type` and its tokenizer, saved to `path`."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def stand_ins(easy_vqa_dir, tmp_path_factory) -> dict[str, Path]:
    """A tiny LM of the recipe's model_type with its tokenizer, and a tiny open_clip checkpoint."""
    root = tmp_path_factory.mktemp("stand_ins")
    vit_config = root / f"{TINY_VIT}.json"
    vit_config.write_text(json.dumps(TINY_VIT_CONFIG))
    open_clip.add_model_config(vit_config)
    torch.save(open_clip.create_model(TINY_VIT).state_dict(), root / "clip.pt")
    return {"lm": save_tiny_lm(LM_TYPE, easy_vqa_dir / "tokenizer", root / "lm"), "clip": root / "clip.pt"}


def stage_args(
    stage: str, trainer_file: str, stand_ins: dict, data_dir: Path, logs: Path, inputs: Path | None = None
) -> list[str]:
    """`stgc fit` arguments of one recipe stage: its files, then paths and sizes for the stand-ins;
    it logs under `logs` and starts from the stage before's checkpoint under `inputs` (or `logs`)."""
    files, data = STAGES[stage]
    configs = [ROOT / "configs" / "trainer.yaml", RECIPE / "model.yaml", *(RECIPE / f for f in files)]
    previous = {"stage2": "stage1", "stage3": "stage2", "stage3_stgc": "stage2"}.get(stage)
    init_from = [f"--model.init_args.init_from={checkpoint(inputs or logs, previous)}"] if previous else []
    return [
        *(arg for path in [*configs, RECIPE / trainer_file] for arg in ("-c", str(path))),
        f"--model.init_args.tokenizer={stand_ins['lm']}",
        f"--model.init_args.lm_path={stand_ins['lm']}",
        f"--model.init_args.vision_model={TINY_VIT}",
        f"--model.init_args.vision_pretrained={stand_ins['clip']}",
        *init_from,
        f"--data.init_args.train_json={data_dir / f'{data}_train.json'}",
        f"--data.init_args.image_folder={data_dir / 'images'}",
        f"--trainer.logger.init_args.save_dir={logs}",
        # sizes: a few records and steps on one CPU process
        "--data.init_args.limit_records=24",
        "--data.init_args.val_fraction=0.2",
        "--data.init_args.batch_size=2",
        "--data.init_args.eval_batch_size=4",
        "--data.init_args.num_workers=0",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",  # two optimizer steps at accumulate_grad_batches 2
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
    ]


def checkpoint(logs: Path, stage: str) -> Path:
    """The last.ckpt a stage writes for the next one."""
    return logs / "moe_llava" / stage / "checkpoints" / "last.ckpt"


def weights(logs: Path, stage: str) -> dict[str, torch.Tensor]:
    """The LVLM weights a stage's last.ckpt holds."""
    return torch.load(checkpoint(logs, stage), map_location="cpu", weights_only=True)["state_dict"]


def differing(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """The keys of `after` whose weights differ from `before`'s, or that `before` lacks."""
    return {k for k, v in after.items() if k not in before or not torch.equal(before[k], v)}


@pytest.fixture(scope="module")
def recipe_runs(stand_ins, easy_vqa_dir, tmp_path_factory) -> tuple[Path, dict]:
    """Stages I, II, III and III + STGC, each from the one before, under the recipe's DDP trainer file."""
    logs = tmp_path_factory.mktemp("logs")
    clis = {}
    for stage in STAGES:
        clis[stage] = stgc(["fit", *stage_args(stage, "trainer_ddp.yaml", stand_ins, easy_vqa_dir, logs)])
    return logs, clis


def test_every_stage_runs_with_the_published_settings(recipe_runs) -> None:
    _, clis = recipe_runs
    expected = {  # stage -> (lr, accumulate_grad_batches, trainable groups)
        "stage1": (1e-3, 1, ["projector"]),
        "stage2": (2e-5, 2, ["projector", "lm"]),
        "stage3": (2e-5, 2, ["experts", "routers", "dense_mlps", "projector"]),
        "stage3_stgc": (2e-5, 2, ["experts", "routers", "dense_mlps", "projector"]),
    }
    for stage, (lr, accumulate, trainable) in expected.items():
        cli = clis[stage]
        trainer, hparams = cli.trainer, cli.model.hparams
        assert (hparams.lr, trainer.accumulate_grad_batches, list(hparams.trainable)) == (
            lr,
            accumulate,
            trainable,
        )
        assert trainer.global_step == 4 // accumulate and trainer.precision == "bf16-mixed"
        assert type(trainer.strategy).__name__ == "DDPStrategy"
        assert cli.model.model.language_model.config.model_type == LM_TYPE
        assert cli.model.model.language_model.is_gradient_checkpointing
    moe = clis["stage3"].model.hparams.moe
    assert moe == {"num_experts": 4, "top_k": 2, "layers": "every_other", "capacity_factor": 1.5}
    assert clis["stage3"].model.hparams.router_aux_loss_coef == 0.01
    assert "stgc/conflict_ratio/all" in clis["stage3_stgc"].trainer.callback_metrics
    assert "stgc/conflict_ratio/all" not in clis["stage3"].trainer.callback_metrics


def test_each_stage_trains_only_its_parts(recipe_runs, stand_ins) -> None:
    """I: the projector (the LM and tower are the stand-ins' files); II: projector and LM; III: the
    experts, each trained away from the stage II MLP it copies, the routers, the MLPs of the layers
    without experts (1 and 3 of 4) and the projector."""
    logs, _ = recipe_runs
    lm = AutoModelForCausalLM.from_pretrained(stand_ins["lm"]).state_dict()
    clip = torch.load(stand_ins["clip"], weights_only=True)
    initial = {f"model.language_model.{k}": v for k, v in lm.items()}
    initial |= {f"model.vision_tower.{k}": v for k, v in clip.items() if k.startswith("visual.")}
    stage1, stage2 = weights(logs, "stage1"), weights(logs, "stage2")
    assert {k.split(".")[1] for k in differing(initial, stage1)} == {"projector"}
    assert {k.split(".")[1] for k in differing(stage1, stage2)} == {"projector", "language_model"}
    for stage in ("stage3", "stage3_stgc"):
        stage3 = weights(logs, stage)
        moved = differing(stage2, stage3)
        dense_mlps = {k for k in stage2 if re.search(r"layers\.[13]\.mlp\.", k)}
        projector = {k for k in stage2 if k.startswith("model.projector.")}
        routers = {k for k in stage3 if ".mlp.router." in k}
        experts = {k for k in stage3 if ".mlp.experts." in k}
        assert len(routers) == 2 and dense_mlps and projector  # MoE in layers 0 and 2 of 4
        assert moved == dense_mlps | projector | routers | experts
        for (
            k
        ) in experts:  # layers.0.mlp.experts.up_proj.weight: (E, ...) copies of layers.0.mlp.up_proj.weight
            dense = k.replace(".experts.", ".")
            assert stage3[k].shape == (4, *stage2[dense].shape), k
            assert not any(torch.equal(expert, stage2[dense]) for expert in stage3[k]), k


def test_fsdp2_trainer_file_trains_stage3_stgc_as_ddp_does(
    recipe_runs, stand_ins, easy_vqa_dir, tmp_path
) -> None:
    """Stage III + STGC under the recipe's FSDP2 file (one process here: the sizes) writes one
    checkpoint file, whose weights are the DDP run's."""
    logs, _ = recipe_runs
    args = stage_args("stage3_stgc", "trainer_fsdp2.yaml", stand_ins, easy_vqa_dir, tmp_path, inputs=logs)
    cli = stgc(["fit", *args, "--trainer.strategy.init_args.data_parallel_size=1"])
    assert type(cli.trainer.strategy).__name__ == "ModelParallelStrategy"
    assert "stgc/conflict_ratio/all" in cli.trainer.callback_metrics
    assert checkpoint(tmp_path, "stage3_stgc").is_file()
    sharded, ddp = weights(tmp_path, "stage3_stgc"), weights(logs, "stage3_stgc")
    assert sharded.keys() == ddp.keys()
    for key in ddp:
        torch.testing.assert_close(sharded[key], ddp[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    ("model_type", "template"),
    [("qwen2", "chat"), ("phi", "vicuna_v1")],  # the paper's other LMs; Qwen with a ChatML chat template
)
def test_stage3_stgc_with_the_other_lms(model_type, template, stand_ins, easy_vqa_dir, tmp_path) -> None:
    """Switching the LM is a change of paths (and of template, for an LM with its own chat format):
    stage III + STGC upcycles their MLPs, trains and validates."""
    tokenizer = easy_vqa_dir / "tokenizer"
    if template == "chat":
        save_chat_tokenizer(tokenizer, "chatml", tmp_path / "tokenizer")
        tokenizer = tmp_path / "tokenizer"
    lm = save_tiny_lm(model_type, tokenizer, tmp_path / model_type)
    args = stage_args("stage3_stgc", "trainer_ddp.yaml", {**stand_ins, "lm": lm}, easy_vqa_dir, tmp_path)
    cli = stgc(["fit", *args, "--model.init_args.init_from=null", f"--data.init_args.template={template}"])
    assert cli.model.model.language_model.config.model_type == model_type
    assert (
        type(cli.datamodule.template).__name__
        == {"chat": "ChatTemplate", "vicuna_v1": "InstructionTemplate"}[template]
    )
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2 and {"stgc/conflict_ratio/all", "val/vqa_acc"} <= set(metrics)
    routers = [k for k in weights(tmp_path, "stage3_stgc") if ".mlp.router." in k]
    assert len(routers) == 2
