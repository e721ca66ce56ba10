"""STGC's settings, each default written once: the flagging threshold τ, the CEL's weight λ and form,
which token gradient and which mean the cosines use, and how the CEL's assignments are selected."""

from dataclasses import dataclass

from stgc.method.loss import LOSS_TYPES, LossForm
from stgc.method.probes import GRADIENTS, MEANS
from stgc.method.selection import SELECTIONS, Selection


@dataclass(frozen=True)
class Settings:
    """What STGC computes (see stgc.callback.STGC for each argument); checked on construction."""

    threshold: float = -0.1  # a token conflicts in an expert when cos(g_t, ḡ_e) < threshold
    loss_weight: float = 0.01  # λ of the CEL; 0 only measures
    loss_type: str | LossForm = "negated_logits"  # a name in LOSS_TYPES, or a form of one's own
    gradient: str = "exact"
    mean: str = "all"
    selection: str | Selection = "gradient"

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold} must be a cosine in [-1, 1]")
        if self.loss_weight < 0:
            raise ValueError(f"loss_weight={self.loss_weight} must be >= 0")
        if not callable(self.loss_type) and self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type={self.loss_type!r} must be one of {LOSS_TYPES} or a stgc.method.loss.LossForm"
            )
        if self.gradient not in GRADIENTS or self.mean not in MEANS:
            raise ValueError(
                f"gradient={self.gradient!r} must be one of {GRADIENTS} and mean={self.mean!r} one of {MEANS}"
            )
        if not isinstance(self.selection, Selection) and self.selection not in SELECTIONS:
            raise ValueError(
                f"selection={self.selection!r} must be one of {SELECTIONS} or a stgc.method.Selection"
            )

    @property
    def selection_name(self) -> str:
        """The selection as a checkpoint's state key names it: its name, or its class's."""
        return self.selection if isinstance(self.selection, str) else type(self.selection).__name__

    @property
    def loss_name(self) -> str:
        """The loss form as the state key names it: its name, or its class's (or function's)."""
        form = self.loss_type
        return form if isinstance(form, str) else getattr(form, "__name__", type(form).__name__)
