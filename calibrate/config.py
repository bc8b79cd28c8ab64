"""The calibration stage's one typed, versioned config."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from visprune.errors import ConfigError
from visprune.methods import PRUNING_METHODS, method
from visprune.models.llava import DEFAULT_MODEL

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class CalibrationConfig:
    """Everything that decides a recipe. Defaults reproduce the README's demo on the embedded model."""

    VERSION = 1
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"method": PRUNING_METHODS, "budget_policy": ("ratio", "absolute")}

    model: str = DEFAULT_MODEL  # "tiny", "tiny-vqa" or a local llava-hf checkpoint folder
    method: str = "fitprune"  # any pruning method of visprune/methods.py
    reduction: float = 0.6  # target fraction of visual-token FLOPs removed, in (0, 1)
    data: Path | None = None  # calibration JSONL; None: the embedded default set
    images: Path | None = None  # folder that image paths resolve against; None: the JSONL's folder
    samples: int | None = None  # use a seeded subset of this many samples; None: all
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int | None = None  # samples replayed together; None: by device (see stage.resolve_batch_size)
    alpha_tolerance: float = 0.01  # bisection stops when the alpha interval is this narrow
    budget_policy: str | None = None  # LLaVA-NeXT: ratio | absolute; None: resolve_budget_policy's default

    def __post_init__(self) -> None:
        if method(self.method).schedule == "none":
            raise ConfigError("Method none prunes nothing: there is no recipe to calibrate.",
                              "Export without --recipe for the unpruned model, or pick a pruning method.")
        if not 0.0 < self.reduction < 1.0:
            raise ConfigError(f"--reduction must lie strictly between 0 and 1, got {self.reduction}.",
                              "Give the fraction of visual-token FLOPs to remove, e.g. --reduction 0.6 for 60 %.")
        if self.samples is not None and self.samples < 1:
            raise ConfigError(f"--samples must be at least 1, got {self.samples}.", "Leave it out to use every sample.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}.", "Try --batch-size 8.")
        if not 0.0 < self.alpha_tolerance < 1.0:
            raise ConfigError(f"alpha tolerance must lie in (0, 1), got {self.alpha_tolerance}.", "Use 0.01.")
        if self.budget_policy not in (None, *self.CHOICES["budget_policy"]):
            raise ConfigError(f"Unknown budget policy {self.budget_policy!r}.", "Use ratio or absolute.")
        if not _DEVICE.match(self.device):
            raise ConfigError(f"Unknown device {self.device!r}.", "Use auto, cpu, cuda or cuda:N.")

    def resolve_budget_policy(self, anyres: bool) -> str:
        """The recipe's policy: `fixed` for LLaVA-1.5 (one N); on LLaVA-NeXT the asked one, else `ratio`
        (FitPrune's), or `absolute` for selections that unroll one step per kept token (a constant K)."""
        if not anyres:
            if self.budget_policy:
                raise ConfigError("--budget-policy applies to LLaVA-NeXT models only; this one has one N per image.",
                                  "Leave --budget-policy out.")
            return "fixed"
        return self.budget_policy or ("absolute" if method(self.method).constant_keep else "ratio")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"] = str(self.data) if self.data else None
        d["images"] = str(self.images) if self.images else None
        return {"version": self.VERSION, **d}
