"""`evaluate_engine`: lmms-eval's `simple_evaluate` over one engine folder, its manifest in the results.

lmms-eval echoes `model_args` into `results["config"]["model_args"]`; for a model passed as an instance it
takes them as given, so here they are the engine's record (`model.engine_record`: folder, seal, backend, model
fingerprint, the recipe's method, hash and per-layer counts) and the figures carry what produced them. (The
`lmms-eval --model visprune --model_args engine=DIR` command line records `engine=DIR` there instead; the
folder's sealed engine.json says the rest.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visprune.errors import BackendUnavailableError, ConfigError


@dataclass(frozen=True)
class LmmsEvalConfig:
    VERSION = 1

    tasks: tuple[str, ...] = ("shapes_vqa",)  # lmms-eval task names
    limit: int | None = None  # documents per task (lmms-eval's --limit: for smoke runs, not for figures)
    batch_size: int = 1  # requests per engine call (a TensorRT engine also keeps to its --max-batch)
    include_path: Path | None = None  # a folder of extra task files (tasks.write_shapes_vqa_task writes one)
    log_samples: bool = True  # keep each document's answer and score in the results ("samples")
    verify: bool = False  # re-hash every engine file before loading

    def __post_init__(self) -> None:
        if not self.tasks or self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise ConfigError("lmms-eval needs at least one task, a batch size of at least 1 and a limit of at "
                              "least 1 (or none).", "Pass e.g. tasks=('shapes_vqa',), batch_size=8.")


def import_lmms_eval():
    """lmms_eval's evaluator and TaskManager, or BackendUnavailableError with the install command."""
    try:
        from lmms_eval import evaluator
        from lmms_eval.tasks import TaskManager
    except ImportError as e:
        raise BackendUnavailableError(f"lmms-eval is not installed ({e}).",
                                      "pip install -e '.[eval]' torch==$(python -c 'import torch; "
                                      "print(torch.__version__)')  (docs/evaluating.md)") from e
    return evaluator, TaskManager


def evaluate_engine(engine_dir: Path, config: LmmsEvalConfig = LmmsEvalConfig()) -> dict[str, Any]:
    """lmms-eval's results dict for the engine at `engine_dir` on `config.tasks`: per-task metrics under
    "results", the engine's record under "config"/"model_args", each document under "samples"."""
    evaluator, TaskManager = import_lmms_eval()
    from reports.lmms.model import VispruneLMMs

    model = VispruneLMMs(engine=engine_dir, batch_size=config.batch_size, verify=config.verify)
    include = str(config.include_path) if config.include_path else None
    return evaluator.simple_evaluate(model=model, model_args=model.record, tasks=list(config.tasks),
                                     batch_size=config.batch_size, limit=config.limit,
                                     log_samples=config.log_samples, bootstrap_iters=0,
                                     task_manager=TaskManager("WARNING", include_path=include))
