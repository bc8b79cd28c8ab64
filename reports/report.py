"""`write_reports(config, engine_dir, out_dir)`: what `visprune report` writes, parity and/or latency."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar
from pathlib import Path

from reports.parity import ParityError
from visprune.errors import ConfigError
from visprune.manifests.engine_set import read_engine_set
from visprune.models.llava import model_folder
from visprune.outputs import REPORT, check_output, replacing


@dataclass(frozen=True)
class ReportConfig:
    VERSION = 1
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"reference": ("auto", "cpu")}

    parity: bool = True
    model: str | None = None  # parity's PyTorch reference; None: the one the engine's manifest names
    recipe: Path | None = None  # parity: check the engine was exported from it
    max_new_tokens: int = 8
    allow_parity_failure: bool = False
    latency: bool = False
    baseline: Path | None = None  # latency: the engine to compare with, normally the unpruned one
    image: Path | None = None
    new_tokens: int = 16
    warmup: int = 3
    rounds: int = 10
    # parity criteria overriding the engine dtype's defaults (reports/parity.py CRITERIA); None: the default
    logits_atol: float | None = None
    logits_rtol: float | None = None
    min_kept_overlap: float | None = None
    min_top1: float | None = None
    reference: str = "auto"  # auto: the engine's dtype on its device where present, else float32 CPU; cpu: always

    def __post_init__(self) -> None:
        if self.latency and self.baseline is None:
            raise ConfigError("--latency compares the engine with a baseline engine; none was given.",
                              "Pass --baseline DIR: build one from the unpruned export (`visprune export` without "
                              "--recipe, then `visprune build`).")
        if not (self.parity or self.latency):
            raise ConfigError("Nothing to report: --no-parity without --latency.", "Drop --no-parity or add --latency.")
        for flag, value, least in (("--max-new-tokens", self.max_new_tokens, 1), ("--new-tokens", self.new_tokens, 1),
                                   ("--warmup", self.warmup, 0), ("--rounds", self.rounds, 1)):
            _check_at_least(flag, value, least)
        if self.reference not in self.CHOICES["reference"]:
            raise ConfigError(f"Unknown --reference {self.reference!r}.", "Use auto or cpu.")
        for name, value in self.criteria().items():
            if value < 0 or (name.startswith("min_") and value > 1):
                raise ConfigError(f"--{name.replace('_', '-')} {value} is out of range.",
                                  "Tolerances are >= 0; minimum shares lie in [0, 1].")

    def criteria(self) -> dict[str, float]:
        """The parity criteria given on the command line (the rest come from the engine's dtype)."""
        names = ("logits_atol", "logits_rtol", "min_kept_overlap", "min_top1")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def _check_at_least(flag: str, value: int, least: int) -> None:
    if value < least:
        raise ConfigError(f"{flag} must be at least {least}, got {value}.",
                          f"Pass {flag} {least} or more, or leave it out for the default.")


def write_reports(config: ReportConfig, engine_dir: Path, out_dir: Path, force: bool = False,
                  verify: bool = False, progress: bool = True) -> list[Path]:
    """Write the requested reports into the report folder `out_dir` (checked before any work, staged and swapped
    in at the end, see visprune/outputs.py); returns their Markdown files where they now lie (in `out_dir`, for a
    `wrote PATH`). A parity failure still writes the folder, then raises. `verify` re-hashes the engines' files
    first; `progress`: progress bars on a terminal."""
    out_dir = Path(out_dir)
    check_output(out_dir, REPORT, inputs=_inputs(config, engine_dir), force=force)
    if config.model is None:  # the checkpoint the engine names, unless told otherwise
        config = replace(config, model=read_engine_set(Path(engine_dir)).onnx_set.model.name)
    for folder in (engine_dir, config.baseline if config.latency else None):
        if verify and folder is not None:  # every load below checks the manifest and sizes anyway
            read_engine_set(Path(folder), verify=True)
    failure = None
    with replacing(out_dir) as staging:
        try:
            _write(config, engine_dir, staging, progress)
        except ParityError as e:  # the report explains the failure: keep it
            failure = e
    if failure:
        raise failure
    names = (["parity.md"] if config.parity else []) + (["latency.md"] if config.latency else [])
    return [out_dir / name for name in names]


def _write(config: ReportConfig, engine_dir: Path, out_dir: Path, progress: bool) -> None:
    from reports.latency import latency_report
    from reports.parity import parity_report

    if config.parity:
        parity_report(engine_dir, config.model, out_dir, max_new_tokens=config.max_new_tokens,
                      allow_failure=config.allow_parity_failure, recipe=config.recipe, criteria=config.criteria(),
                      reference=config.reference, progress=progress)
    if config.latency:
        latency_report(engine_dir, config.baseline, out_dir, image=config.image, new_tokens=config.new_tokens,
                       warmup=config.warmup, rounds=config.rounds)


def _inputs(config: ReportConfig, engine_dir: Path) -> list[Path | None]:
    return [Path(engine_dir), config.baseline, config.recipe, config.image,
            model_folder(config.model) if config.model else None]
