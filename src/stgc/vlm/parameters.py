"""A transformers VLM's parameters by the group names `trainable` accepts, found by module structure."""

from collections.abc import Sequence

from torch import nn
from transformers import PreTrainedModel

from stgc.method.hf_experts import is_hf_experts
from stgc.method.llama4 import is_llama4_moe
from stgc.trainable import train_only

VISION_TOWERS = ("visual", "vision_tower", "vision_model")  # Qwen-VL, LLaVA-style, Idefics-style
PROJECTORS = ("merger", "deepstack_merger_list", "multi_modal_projector")  # Qwen-VL's (in the tower), LLaVA's
ROUTERS = ("gate", "router")  # the MoE block's child beside its experts


def parameter_groups(model: PreTrainedModel) -> dict[str, list[nn.Parameter]]:
    """vision_tower (without its projector), projector, lm (the language model and its head), and of
    every MoE block (a module with transformers `experts`, or Llama 4's) its experts and its router."""
    vision = _first_child(model, VISION_TOWERS)
    projector = [p for name in PROJECTORS for p in _parameters(_first_child(model, (name,)))]
    projector_ids = {id(p) for p in projector}
    blocks = [m for m in model.modules() if is_hf_experts(getattr(m, "experts", None)) or is_llama4_moe(m)]
    language_model = _first_child(model, ("language_model",))
    return {
        "vision_tower": [p for p in _parameters(vision) if id(p) not in projector_ids],
        "projector": projector,
        "lm": _unique([*_parameters(language_model), *_parameters(model.get_output_embeddings())]),
        "experts": [p for block in blocks for p in block.experts.parameters()],
        "routers": [p for block in blocks for p in _parameters(_first_child(block, ROUTERS))],
    }


def freeze_all_but(model: PreTrainedModel, trainable: Sequence[str]) -> None:
    """Only the parameters of the `trainable` groups train; a group that names none is an error."""
    train_only(model, parameter_groups(model), trainable, f"in {type(model).__name__}")


def _first_child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    """The first module named one of `names` inside `module` (itself excluded), shallowest first."""
    found = [
        (name.count("."), name, m) for name, m in module.named_modules() if name.rpartition(".")[2] in names
    ]
    return min(found, key=lambda entry: entry[:2])[2] if found else None


def _parameters(module: nn.Module | None) -> list[nn.Parameter]:
    return [] if module is None else list(module.parameters())


def _unique(parameters: list[nn.Parameter]) -> list[nn.Parameter]:
    """Each parameter once (a head tied to the embeddings is the same tensor)."""
    return list({id(p): p for p in parameters}.values())
