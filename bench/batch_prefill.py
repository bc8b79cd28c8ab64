"""Prefill throughput of a batched engine: one call over B requests against B batch-1 calls (issue 14, section 4).

The tiny engines (FitPrune 60 % and unpruned, ONNX Runtime, CPU) built in --work; eight requests mixing the
default calibration set's images and four prompt layouts (the template, a system prompt, a chat turn before the
image, a long question), so every batch is left-padded and each row has its own image offset. For B in 1, 4, 8:
`Pipeline.prefill_batch` over the B requests (vision + embed + prefill, one call) against B calls of one request
each; `--rounds` alternating timed rounds after a warm-up. Also checks that every row's first token is the same
either way.

    VISPRUNE_CACHE=/tmp/vpcache .venv/bin/python bench/batch_prefill.py --work /tmp/bp    # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import prefill_latency  # noqa: E402  (the bench checkpoint)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BATCHES = (1, 4, 8)


def build_engines(work: Path, model: str = "tiny") -> dict[str, Path]:
    """ONNX Runtime engines: FitPrune 60 %, DivPrune 60 % (the demo's method: one selection before the LLM) and
    unpruned. `model` "tiny", or "bench": prefill_latency.py's d = 1024 checkpoint, whose language model
    dominates a request as a 7B one does (FitPrune calibrated on 8 samples, cached in `work`)."""
    from calibrate.stage import budget_recipe
    from engines import BuildConfig, build_engine
    from exporter import ExportConfig, export_onnx
    from visprune.models import load_llava

    checkpoint = "tiny" if model == "tiny" else str(prefill_latency.ensure_bench_model()[0])
    recipes = {"fitprune-60": _fitprune_60(checkpoint, work),
               "divprune-60": budget_recipe(load_llava(checkpoint).shape, 0.6, "divprune").to_dict(), "unpruned": None}
    engines = {}
    for name, recipe in recipes.items():
        engine = work / f"{name}-engine"
        if not (engine / "engine.json").exists():
            recipe_path = work / f"{name}.json" if recipe else None
            if recipe:
                recipe_path.write_text(json.dumps(recipe))
            export_onnx(ExportConfig(model=checkpoint, recipe=recipe_path), work / f"{name}-onnx", progress=False,
                        force=True)
            build_engine(BuildConfig(), work / f"{name}-onnx", engine, force=True)
        engines[name] = engine
    return engines


def _fitprune_60(checkpoint: str, work: Path) -> dict[str, Any]:
    if checkpoint == "tiny":  # tiny's calibrated counts (tests/conftest.py TINY_RECIPE_60): six pruning layers
        return {"method": "fitprune", "num_visual_tokens": 576, "removed": [143, 101, 44, 41, 18, 28, 0, 0]}
    recipes = prefill_latency.calibrate_recipes(Path(checkpoint), [0.6], 8, work, reuse=True)
    return recipes[0.6]["recipe"].to_dict()


LAYOUT_QUESTIONS = ("What is this?", "Color?", "What is in the picture?",
                    "Describe every object you can see in this picture, one by one, with its colour.")


def layouts(pipe, questions=LAYOUT_QUESTIONS) -> list[str]:
    """Four prompt layouts: the template, a system prompt before it, a chat turn before the image, a long question."""
    return [pipe.chat_prompt(questions[0]), "SYSTEM: Answer in one word.\n" + pipe.chat_prompt(questions[1]),
            f"USER: Hello there.\nASSISTANT: Hi!\nUSER: <image>\n{questions[2]} ASSISTANT:",
            pipe.chat_prompt(questions[3])]


def mixed_requests(pipe, count: int) -> list[Any]:
    from calibrate.data import default_calibration_set
    from runtime.pipeline import Request

    images = [s.image for s in default_calibration_set().samples[:count]]
    prompts = layouts(pipe)
    return [pipe.encode_request(Request(image, prompts[i % 4], 1)) for i, image in enumerate(images)]


def time_batch(pipe, encoded: list[Any], batched: bool) -> tuple[float, list[int]]:
    """Seconds for the prefill of `encoded` as one call or one call per request, and each row's first token."""
    start = time.perf_counter()
    firsts = [pipe.prefill_batch(encoded)[0]] if batched else [pipe.prefill_batch([e])[0] for e in encoded]
    seconds = time.perf_counter() - start
    return seconds, [int(t) for first in firsts for t in first.logits.argmax(-1)]


def measure(pipe, encoded: list[Any], rounds: int) -> dict[str, Any]:
    rows = {}
    for batch in BATCHES:
        chunk = encoded[:batch]
        for mode in (True, False):  # warm-up at this shape
            time_batch(pipe, chunk, mode)
        times: dict[bool, list[float]] = {True: [], False: []}
        for round_index in range(rounds):
            for mode in ((True, False) if round_index % 2 == 0 else (False, True)):
                seconds, tokens = time_batch(pipe, chunk, mode)
                times[mode].append(seconds)
                rows.setdefault(batch, {}).setdefault("tokens", {})[mode] = tokens
        batched, single = statistics.median(times[True]), statistics.median(times[False])
        same = rows[batch]["tokens"][True] == rows[batch]["tokens"][False]
        rows[batch] = {"batched_s": batched, "one_by_one_s": single, "batched_requests_per_s": batch / batched,
                       "one_by_one_requests_per_s": batch / single, "speedup": single / batched,
                       "same_first_tokens": same}
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Batched prefill throughput (tiny, ONNX Runtime, CPU)", "",
             f"{report['cpu']}; {report['rounds']} timed rounds per cell, medians. Vision + embed + prefill.", "",
             "| engine | batch | one call (ms) | B batch-1 calls (ms) | requests/s batched | requests/s one by one "
             "| speedup | same first tokens |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, rows in report["engines"].items():
        for batch, r in rows.items():
            lines.append(f"| {name} | {batch} | {1e3 * r['batched_s']:.1f} | {1e3 * r['one_by_one_s']:.1f} | "
                         f"{r['batched_requests_per_s']:.1f} | {r['one_by_one_requests_per_s']:.1f} | "
                         f"{r['speedup']:.2f}x | {r['same_first_tokens']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import platform

    from runtime.pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"cpu": platform.processor() or platform.machine(), "rounds": args.rounds, "engines": {}}
    for name, engine in build_engines(args.work).items():
        pipe = Pipeline.from_engine_dir(engine)
        report["engines"][name] = measure(pipe, mixed_requests(pipe, max(BATCHES)), args.rounds)
        print(markdown(report))
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "batch_prefill.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS_DIR / "batch_prefill.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
