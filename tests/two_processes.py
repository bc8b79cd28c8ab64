"""Fixture exports split over two processes: tracing a graph is mostly one core's work, so on a two-core machine
two exports take about the time of one.

Kept apart from conftest.py: the spawned process imports this module, and a conftest imported there would give
that process a second private model cache.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, Callable

from workflows.end_to_end import InBackground

Job = tuple[Callable[..., Any], tuple]  # fn(*args); fn importable by name (a spawned process runs it)


def run_in_two_processes(here: list[Job], there: list[Job]) -> None:
    """`there`'s jobs in turn in a spawned process while `here`'s run in turn in this one; the first error
    raised in either is raised here."""
    with InBackground(run_in_turn, there) as background:
        run_in_turn(here)
        background.result()


def run_in_turn(jobs: list[Job]) -> None:
    for fn, args in jobs:
        fn(*args)


@cache
def _tiny():
    from visprune.models import load_llava

    return load_llava("tiny")


def export_tiny_graph(graph: str, recipe, image_start: int, out: Path, opset: int, kernels) -> None:
    """One of tiny's language-model graphs ("prefill" or "decode") for `recipe`, max_seq 2048."""
    from exporter.graphs import export_decode, export_prefill

    export = export_prefill if graph == "prefill" else export_decode
    export(_tiny().model, recipe, image_start, 2048, out, opset, kernels)


def export_and_build(recipe_path: Path | None, root: Path, model: str = "tiny") -> None:
    """`model`'s ONNX set for the recipe (None: unpruned; root/onnx) and its ONNX Runtime engine (root/engine),
    default configs."""
    from engines import BuildConfig, build_engine
    from exporter import ExportConfig, export_onnx

    export_onnx(ExportConfig(model=model, recipe=recipe_path), root / "onnx", progress=False)
    build_engine(BuildConfig(backend="onnxruntime"), root / "onnx", root / "engine")
