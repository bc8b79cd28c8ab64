"""Stage 2, export: bake a recipe's per-layer keep counts into the language model (in-graph scoring, TopK with
constant K, Gather) and export vision, prefill and decode graphs to ONNX, linted for TensorRT.

    from exporter import ExportConfig, export_onnx
    export_onnx(ExportConfig(model="tiny", recipe="runs/demo/recipe.json"), "runs/demo/onnx")
"""

from exporter.config import ExportConfig
from exporter.export import ExportResult, export_onnx, lint_exported_set
from exporter.lint import Violation, lint_onnx

__all__ = ["ExportConfig", "ExportResult", "Violation", "export_onnx", "lint_exported_set", "lint_onnx"]
