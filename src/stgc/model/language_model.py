"""The language model: any transformers causal LM, from a local directory or from a config."""

from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """A local transformers tokenizer directory (the bundled easy-vqa one, or a real LM's)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"tokenizer={path!r} is not a directory. For the bundled easy-vqa default run "
            "`python scripts/prepare_easy_vqa.py` (or `make data`) first."
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token  # LLaVA's choice for LLaMA
    return tokenizer


def build_language_model(
    tokenizer: PreTrainedTokenizerBase, path: str | None = None, config: dict[str, Any] | None = None
) -> PreTrainedModel:
    """A pretrained causal LM from a local `path`, or a fresh one from `config` (needs "model_type")."""
    if (path is None) == (config is None):
        raise ValueError("give exactly one of lm_path (a local pretrained LM) and lm_config (a fresh LM)")
    if path is not None:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"lm_path={path!r} is not a local model directory")
        return AutoModelForCausalLM.from_pretrained(path)
    config = dict(config)
    if "model_type" not in config:
        raise ValueError(f"lm_config needs a 'model_type' key (e.g. 'qwen2'), got keys {sorted(config)}")
    lm_config = AutoConfig.for_model(
        config.pop("model_type"),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config,
    )
    return AutoModelForCausalLM.from_config(lm_config)
