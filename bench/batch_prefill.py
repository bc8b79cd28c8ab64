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

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BATCHES = (1, 4, 8)


def build_engines(work: Path) -> dict[str, Path]:
    """The pruned (FitPrune 60 %, tiny's calibrated counts) and unpruned ONNX Runtime engines of tiny."""
    from engines import BuildConfig, build_engine
    from exporter import ExportConfig, export_onnx

    recipe = work / "recipe.json"
    recipe.write_text(json.dumps({"method": "fitprune", "num_visual_tokens": 576,
                                  "removed": [143, 101, 44, 41, 18, 28, 0, 0]}))
    engines = {}
    for name, recipe_path in (("pruned", recipe), ("unpruned", None)):
        engine = work / f"{name}-engine"
        if not (engine / "engine.json").exists():
            export_onnx(ExportConfig(model="tiny", recipe=recipe_path), work / f"{name}-onnx", progress=False, force=True)
            build_engine(BuildConfig(), work / f"{name}-onnx", engine, force=True)
        engines[name] = engine
    return engines


def mixed_requests(pipe, count: int) -> list[Any]:
    from calibrate.data import default_calibration_set
    from runtime.pipeline import Request

    images = [s.image for s in default_calibration_set().samples[:count]]
    layouts = [pipe.chat_prompt("What is this?"), "SYSTEM: Answer in one word.\n" + pipe.chat_prompt("Color?"),
               "USER: Hello there.\nASSISTANT: Hi!\nUSER: <image>\nWhat is in the picture? ASSISTANT:",
               pipe.chat_prompt("Describe every object you can see in this picture, one by one, with its colour.")]
    return [pipe.encode_request(Request(image, layouts[i % 4], 1)) for i, image in enumerate(images)]


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
