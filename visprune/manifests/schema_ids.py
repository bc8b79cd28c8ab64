"""Each artifact kind's schema id, version and file: one place for them. The typed schemas (this package), the
recipe (calibrate/recipe.py), the writers and the output-location rules (visprune/outputs.py) all read them here.

Plain data with no imports: visprune/outputs.py needs it, and visprune/models imports outputs, so the schemas,
which import visprune/models, cannot be what outputs imports.
"""

from __future__ import annotations

from typing import NamedTuple


class SchemaId(NamedTuple):
    """The `schema` and `schema_version` an artifact carries, and the file that carries them: the marker file of
    a folder artifact, or "" when the artifact is the file itself (a recipe, a plot)."""

    name: str
    version: int | None  # None: unversioned (a plot)
    file: str


RECIPE = SchemaId("visprune.recipe", 1, "")
ONNX_SET = SchemaId("visprune.onnx_set", 3, "manifest.json")  # 3: batched graphs (image_starts, pad_lengths inputs)
ENGINE_SET = SchemaId("visprune.engine_set", 4, "engine.json")  # 4: the PyTorch engine's static shapes
# 3: per-step scaled logits atol, near-tie flips, logits_judged, kept mismatches
PARITY_REPORT = SchemaId("visprune.parity_report", 3, "parity.json")
LATENCY_REPORT = SchemaId("visprune.latency_report", 2, "latency.json")  # 2: memory as load_bytes and working_bytes
EVAL_REPORT = SchemaId("visprune.eval_report", 1, "eval.json")
TRADEOFF = SchemaId("visprune.tradeoff", 2, "tradeoff.json")
PIPELINE_RUN = SchemaId("visprune.pipeline_run", 1, "pipeline.json")
PLOT = SchemaId("visprune.plot", None, "")  # carried in a PNG text chunk (visprune/figures.py)
TRITON_REPO = SchemaId("visprune.triton_repo", None, "visprune-triton.json")  # serving/triton_repo.py
