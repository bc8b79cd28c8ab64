"""The export stage's one typed, versioned config."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from visprune.errors import ConfigError
from visprune.backends import EXPORT_TARGETS as TARGETS
from visprune.dtypes import DTYPES
from visprune.models.llava import DEFAULT_MODEL


@dataclass(frozen=True)
class ExportConfig:
    VERSION = 2  # 2: target, and opset by target
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"dtype": DTYPES, "target": tuple(TARGETS)}

    model: str = DEFAULT_MODEL  # "tiny", "tiny-vqa" or a local llava-hf checkpoint folder
    recipe: Path | None = None  # None: the unpruned model
    dtype: str = "float32"  # graph dtype; float16/bfloat16 keep norms, softmax and scores in float32
    target: str = "onnxruntime"  # the backend family the graphs are written for (visprune/backends.py)
    opset: int | None = None  # None: the target's (TARGETS)
    max_seq: int | None = None  # longest prompt (text + image tokens) + generated tokens; None: by model (export.py)
    allow_other_model: bool = False  # accept a recipe calibrated on another checkpoint of this architecture

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"Unknown --dtype {self.dtype!r}.", f"Use one of: {', '.join(DTYPES)}.")
        if self.target not in TARGETS:
            raise ConfigError(f"Unknown --target {self.target!r}.", f"Use one of: {', '.join(TARGETS)}.")
        if self.opset is None:
            object.__setattr__(self, "opset", TARGETS[self.target])
        if self.opset < TARGETS[self.target]:
            raise ConfigError(f"--opset {self.opset} is too old for --target {self.target}.",
                              f"Use opset {TARGETS[self.target]} or newer, or leave --opset out.")
        if self.max_seq is not None and self.max_seq < 2:
            raise ConfigError(f"--max-seq must be at least 2, got {self.max_seq}.", "Try --max-seq 2048.")

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, **asdict(self), "recipe": str(self.recipe) if self.recipe else None}
