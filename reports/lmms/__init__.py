"""lmms-eval over visprune engines: benchmark numbers (GQA, TextVQA, POPE, MME, MMBench, shapes-vqa) for a recipe,
measured through the runtime exactly as `visprune run` answers.

- `model.py`: the lmms-eval model `visprune` (any engine folder, any backend, any recipe), registered through the
  `lmms_eval.models` entry point (`model_manifest` below), so `lmms-eval --model visprune --model_args
  engine=DIR` works once visprune and lmms-eval share an environment (`pip install -e '.[eval]'`).
- `evaluate.py`: `evaluate_engine`, lmms-eval's `simple_evaluate` over one engine with the engine's manifest
  recorded in the results' `config.model_args`.
- `tasks.py` and `shapes_vqa/`: the held-out shapes-vqa questions as a local lmms-eval task.

Only this package imports lmms_eval, and only when one of its functions runs (or lmms-eval loads `model.py`).
"""

from __future__ import annotations

MODEL_ID = "visprune"


def model_manifest():
    """The entry point's payload (group `lmms_eval.models`): lmms-eval calls it while building its registry, so
    lmms_eval is importable here and the model class is imported only when `--model visprune` asks for it."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="reports.lmms.model.VispruneLMMs")
