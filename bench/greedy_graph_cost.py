"""What an unrolled greedy selection costs the graph: AdaptPrune's soft NMS and DivPrune's max-min loop (one step
per kept token) next to FastV's single TopK, on tiny-vqa at the same FLOPs budgets.

For each (method, reduction) it builds the budget recipe, exports the ONNX set (`export_onnx`, lint included,
timed), counts the prefill graph's nodes and its ArgMax steps, times creating an ONNX Runtime session on
prefill.onnx (what an engine build and every engine open pay), and times the prefill of the first held-out
question against the unpruned engine's, visited alternately (medians).

    VISPRUNE_CACHE=/tmp/vpcache .venv/bin/python bench/greedy_graph_cost.py [--rounds 30]

Writes bench/results/greedy_graph_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CELLS = [("fastv", 0.4), ("adaptprune", 0.4), ("divprune", 0.4), ("fastv", 0.8), ("adaptprune", 0.8),
         ("divprune", 0.8)]


def built_engine(recipe, work: Path, tag: str) -> tuple[float, Path]:
    """(export seconds, engine folder) for `recipe` (None: unpruned) on tiny-vqa."""
    from calibrate.recipe import save_recipe
    from engines import BuildConfig, build_engine
    from exporter import ExportConfig, export_onnx

    recipe_path = None
    if recipe is not None:
        recipe_path = work / f"{tag}.json"
        save_recipe(recipe, recipe_path)
    start = time.perf_counter()
    export_onnx(ExportConfig(model="tiny-vqa", recipe=recipe_path), work / f"{tag}-onnx", progress=False)
    seconds = time.perf_counter() - start
    build_engine(BuildConfig(backend="onnxruntime"), work / f"{tag}-onnx", work / f"{tag}-engine")
    return seconds, work / f"{tag}-engine"


def graph_counts(onnx_path: Path) -> dict[str, int]:
    import onnx

    ops = collections.Counter(n.op_type for n in onnx.load(onnx_path, load_external_data=False).graph.node)
    return {"nodes": sum(ops.values()), "argmax": ops["ArgMax"]}


def session_seconds(onnx_path: Path, repeats: int = 3) -> float:
    import onnxruntime as ort

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prefill_call(engine: Path):
    from runtime.pipeline import Pipeline
    from workflows.tradeoff import _prefill_call

    return _prefill_call(Pipeline.from_engine_dir(engine))


def interleaved_ms(pruned, base, rounds: int) -> tuple[float, float]:
    times: dict = {pruned: [], base: []}
    for _ in range(3):
        pruned(), base()
    for i in range(rounds):
        for call in (pruned, base) if i % 2 == 0 else (base, pruned):
            start = time.perf_counter()
            call()
            times[call].append(time.perf_counter() - start)
    return statistics.median(times[pruned]) * 1e3, statistics.median(times[base]) * 1e3


def measure(rounds: int) -> dict:
    from calibrate.stage import budget_recipe
    from visprune.models.llava import LanguageModelShape, load_llava_config

    shape = LanguageModelShape.from_config(load_llava_config("tiny-vqa"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base_export, base_engine = built_engine(None, work, "unpruned")
        base = prefill_call(base_engine)
        rows.append({"method": "none", "reduction": 0.0, "keep": 576, "export_s": round(base_export, 1),
                     **graph_counts(work / "unpruned-onnx" / "prefill.onnx"),
                     "session_s": round(session_seconds(work / "unpruned-onnx" / "prefill.onnx"), 3)})
        for method, reduction in CELLS:
            recipe = budget_recipe(shape, reduction, method)
            tag = f"{method}-{reduction}"
            export_s, engine = built_engine(recipe, work, tag)
            pruned_ms, base_ms = interleaved_ms(prefill_call(engine), base, rounds)
            prefill = work / f"{tag}-onnx" / "prefill.onnx"
            rows.append({"method": method, "reduction": reduction, "keep": recipe.keep[-1] if any(recipe.removed)
                         else shape.num_visual_tokens - recipe.removed_before_llm, "export_s": round(export_s, 1),
                         **graph_counts(prefill), "session_s": round(session_seconds(prefill), 3),
                         "prefill_ms": round(pruned_ms, 2), "unpruned_prefill_ms": round(base_ms, 2),
                         "prefill_latency_ratio": round(pruned_ms / base_ms, 3)})
            print(rows[-1], flush=True)
    return {"rows": rows, "machine": machine(), "rounds": rounds}


def machine() -> dict:
    import onnxruntime
    import torch

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()]}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Greedy selections in the graph: export, session and prefill cost (tiny-vqa, ONNX Runtime CPU)", "",
             f"{m['cpu_count']} CPU cores, {m['platform']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}; "
             f"load average after (1/5/15 min) {m['loadavg_1_5_15_after']}; prefill medians of "
             f"{result['rounds']} alternating rounds, batch 1, the first held-out question.", "",
             "| method | budget | kept | greedy steps (ArgMax) | prefill nodes | export s | session s | "
             "prefill ms | unpruned ms | latency ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['reduction']:.0%} | {r['keep']} | {r['argmax']} | {r['nodes']} | "
                     f"{r['export_s']} | {r['session_s']} | {r.get('prefill_ms', '')} | "
                     f"{r.get('unpruned_prefill_ms', '')} | {r.get('prefill_latency_ratio', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    result = measure(parser.parse_args().rounds)
    out = ROOT / "bench" / "results"
    (out / "greedy_graph_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "greedy_graph_cost.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
