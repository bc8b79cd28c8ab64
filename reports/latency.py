"""Latency reports: a pruned engine and its baseline (normally the unpruned engine) measured side by side in one
run, with the FLOPs ratio next to the latency ratio and the method written down with the numbers.

Method (recorded in every report):
- One request = vision -> embed -> prefill -> first token -> `new_tokens - 1` decode steps, stamped with one
  clock between phases. TTFT runs from preprocessed inputs to the first token (tokenizer and image
  preprocessing excluded: they are the same for every engine).
- Every runner call returns host arrays, so each stamp is taken after the device finished (synchronized).
- Warm-up requests per engine first; then rounds. In each round every engine gets one untimed request (so ORT's
  spinning threads and caches of the other engine do not bill this one) and one timed request; the engine order
  alternates between rounds to cancel drift.
- Memory (`MEMORY_METHODS`, written into each report): what loading the engine takes (both loads after an
  unmeasured first open, which pays for starting the runtime: `_start_runtime`) and what its requests add,
  from the process's resident memory on CPU (working: the peak) and from the whole device's memory in use on
  CUDA (every allocator; working: the level after warm-up). KV bytes: the cache after prefill and after the
  last token.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from runtime.generation import run_tokens
from runtime.pipeline import EncodedRequest, EngineStep, Pipeline
from runtime.pipeline import Request as PipelineRequest
from visprune.artifacts import atomic_write_bytes, tool_versions
from visprune.errors import ArtifactMismatchError, ConfigError
from visprune.manifests.common import model_dump, write_model
from visprune.manifests.engine_set import read_engine_set
from visprune.manifests.reports import LATENCY_SCHEMA, LatencyRatios, LatencyReport
from visprune.methods import METHODS
from visprune.figures import pyplot, save_figure

Clock = Callable[[], float]


@dataclass(frozen=True)
class LatencyStats:
    """Summary of timed samples, in milliseconds."""

    n: int
    p50_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def from_seconds(cls, samples: list[float]) -> "LatencyStats":
        ms = np.asarray(samples, dtype=np.float64) * 1e3
        return cls(n=len(ms), p50_ms=float(np.percentile(ms, 50)), p90_ms=float(np.percentile(ms, 90)),
                   mean_ms=float(ms.mean()), std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
                   min_ms=float(ms.min()), max_ms=float(ms.max()))


def measure(fn: Callable[[], Any], warmup: int, iterations: int, clock: Clock = time.perf_counter) -> LatencyStats:
    """Run `fn` `warmup` times untimed, then time `iterations` calls (fn must return after its device work)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iterations):
        start = clock()
        fn()
        samples.append(clock() - start)
    return LatencyStats.from_seconds(samples)


@dataclass
class Request:
    input_ids: np.ndarray  # [1, S]
    pixel_values: np.ndarray  # [1, 3, H, W]
    new_tokens: int
    encoded: EncodedRequest | None = None  # the pipeline's own (LLaVA-NeXT: views, N), used when present

    @property
    def num_visual(self) -> int | None:
        return None if self.encoded is None else self.encoded.num_visual


def time_request(pipe: Pipeline, request: Request, clock: Clock = time.perf_counter) -> dict[str, Any]:
    """One request with a fixed number of new tokens (EOS ignored), phase by phase."""
    runner, stamps = pipe.runner, [clock()]
    encoded = [request.encoded] if request.encoded else None
    vision = pipe.image_features_of(encoded) if encoded else runner.image_features(request.pixel_values)
    stamps.append(clock())
    embeds, layout = pipe.embed_batch(encoded, vision) if encoded else pipe.embed(request.input_ids, vision.features)
    stamps.append(clock())
    first = runner.prefill(embeds, layout, vision.scores)  # its logits hold the first token: TTFT ends here
    stamps.append(clock())
    step = EngineStep(pipe, first.past, np.array([request.input_ids.shape[1]]), layout)
    steps = run_tokens(first.logits, step, request.new_tokens, eos=None, clock=clock).step_seconds  # fixed length
    return {"vision_s": stamps[1] - stamps[0], "prefill_s": stamps[3] - stamps[2], "ttft_s": stamps[3] - stamps[0],
            "decode_step_s": steps, "kv_bytes_prefill": runner.kv_bytes(first.past),
            "kv_bytes_final": runner.kv_bytes(step.past)}


def measure_side_by_side(pipes: dict[str, Pipeline], request: Request, warmup: int, rounds: int,
                         clock: Clock = time.perf_counter) -> dict[str, list[dict[str, Any]]]:
    """Timed requests per engine: warm-up each, then rounds of (untimed, timed) visits in alternating order."""
    for pipe in pipes.values():
        for _ in range(warmup):
            time_request(pipe, request, clock)
    timed: dict[str, list[dict[str, Any]]] = {name: [] for name in pipes}
    names = list(pipes)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            time_request(pipes[name], request, clock)  # re-warm after the other engine ran
            timed[name].append(time_request(pipes[name], request, clock))
    return timed


def summarize_requests(requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-phase statistics of timed requests, decode throughput and the KV bytes."""
    steps = [s for r in requests for s in r["decode_step_s"]]
    decode = LatencyStats.from_seconds(steps) if steps else None
    return {
        "vision": asdict(LatencyStats.from_seconds([r["vision_s"] for r in requests])),
        "prefill": asdict(LatencyStats.from_seconds([r["prefill_s"] for r in requests])),
        "ttft": asdict(LatencyStats.from_seconds([r["ttft_s"] for r in requests])),
        "decode_per_token": asdict(decode) if decode else None,
        "decode_tokens_per_s": 1e3 / decode.p50_ms if decode else None,
        "kv_bytes_prefill": requests[0]["kv_bytes_prefill"], "kv_bytes_final": requests[0]["kv_bytes_final"],
    }


def latency_report(engine: Path | Pipeline, baseline: Path | Pipeline, out_dir: Path, image: Path | None = None,
                   question: str = "What is in the picture?", new_tokens: int = 16, warmup: int = 3, rounds: int = 10,
                   clock: Clock = time.perf_counter) -> LatencyReport:
    """Measure `engine` against `baseline` on one request; write latency.json, latency.md, latency.png. Each is an
    engine folder or a Pipeline already open on one (the whole-pipeline run hands over its own rather than open a
    second copy; the memory its loading took is then not measured)."""
    if rounds < 1 or warmup < 0 or new_tokens < 1:
        raise ConfigError(f"rounds {rounds}, warm-up {warmup} and new tokens {new_tokens} must be >= 1, >= 0, >= 1.",
                          "Pass e.g. --rounds 10 --warmup 3 --new-tokens 16.")
    runtime_started = _start_runtime(engine, baseline)
    loaded = {name: _load_measuring_memory(e) for name, e in (("pruned", engine), ("baseline", baseline))}
    pipes = {name: pipe for name, (pipe, _) in loaded.items()}
    _check_comparable(pipes["pruned"], pipes["baseline"])
    request = _request(pipes["pruned"], image, question, new_tokens)  # same processor and layout for both
    memory = {name: _warm_up_measuring_memory(pipe, request, warmup, marks) for name, (pipe, marks) in loaded.items()}
    del runtime_started  # held until the memory was measured: its freed memory would otherwise be counted as free
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    timed = measure_side_by_side(pipes, request, warmup=0, rounds=rounds, clock=clock)
    engines = {name: {"engine_dir": str(pipe.engine_dir.resolve()), **_engine_facts(pipe),
                      **summarize_requests(timed[name]), "memory": memory[name]}
               for name, pipe in pipes.items()}
    prompt_tokens = int(request.input_ids.shape[1])
    num_visual = request.num_visual or pipes["pruned"].num_visual  # LLaVA-NeXT: this image's N
    report = LatencyReport(
        request={"image": str(image) if image else "default cat photograph", "question": question,
                 "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "visual_tokens": num_visual},
        engines=engines, method=_method(warmup, rounds, clock, load_before, pipes["pruned"]),
        ratios=_ratios(prompt_tokens, num_visual, engines, pipes))
    out_dir = Path(out_dir)
    write_model(out_dir / LATENCY_SCHEMA.file, report)
    atomic_write_bytes(out_dir / "latency.md", latency_markdown(report).encode())
    plot_latency(report, out_dir / "latency.png")
    return report


def _start_runtime(engine: Path | Pipeline, baseline: Path | Pipeline) -> Pipeline | None:
    """An unmeasured first open of `engine`, so both measured loads happen in a started runtime. The first open
    in a process pays for the runtime (imports, ONNX Runtime's environment and thread pools, a CUDA context):
    tiny's engines measured 368.5 vs 8.6 MiB in one order and 366.9 vs 10.5 in the other; after this open, kept
    open so its memory is not reused, 11.0 vs 8.3 and 11.1 vs 7.9 MiB. None when a Pipeline is open already."""
    if isinstance(engine, Pipeline) or isinstance(baseline, Pipeline):
        return None
    return Pipeline.from_engine_dir(Path(engine))


def _load_measuring_memory(engine: Path | Pipeline) -> tuple[Pipeline, dict[str, Any]]:
    """The engine's Pipeline, and the memory in use on its device before and after loading it (before: None for
    a Pipeline that was open already)."""
    if isinstance(engine, Pipeline):
        return engine, {"before_load": None, "after_load": memory_in_use(engine.manifest.device)}
    device = read_engine_set(Path(engine)).device
    before = memory_in_use(device)
    pipe = Pipeline.from_engine_dir(engine)
    return pipe, {"before_load": before, "after_load": memory_in_use(device)}


def _warm_up_measuring_memory(pipe: Pipeline, request: Request, warmup: int, marks: dict[str, Any]) -> dict[str, Any]:
    """Warm-up requests; returns the engine's file bytes, the memory its loading took and the memory its
    requests add on top (what each figure is on this device: `method`)."""
    kind = "cuda" if pipe.runner.device.startswith("cuda") else "cpu"
    _reset_peak(kind)
    for _ in range(max(warmup, 1)):
        time_request(pipe, request)
    after = memory_in_use(kind) if kind == "cuda" else _proc_status_bytes("VmHWM") or None
    engine_bytes = sum(p.stat().st_size for p in pipe.engine_dir.iterdir() if p.suffix in (".onnx", ".plan", ".data"))
    return {"engine_file_bytes": engine_bytes, "load_bytes": _difference(marks["after_load"], marks["before_load"]),
            "working_bytes": _difference(after, marks["after_load"]),
            "method": MEMORY_METHODS[kind] + ("" if marks["before_load"] is not None else NOT_LOADED_HERE)}


MEMORY_METHODS = {
    "cpu": "process resident memory: load = RSS after loading minus before, with the runtime started by an "
           "unmeasured open of the pruned engine first; working = peak RSS during warm-up "
           "(VmHWM, reset first) minus RSS after loading",
    "cuda": "whole-device memory in use (cudaMemGetInfo via torch.cuda.mem_get_info, so every allocator counts: "
            "TensorRT's context and buffers, ONNX Runtime's arena, PyTorch's cache): load = after loading minus "
            "before, with the runtime and CUDA context started by an unmeasured open of the pruned engine first; "
            "working = after warm-up minus after loading, a level, not a peak (other processes on the GPU "
            "would count too)",
}

NOT_LOADED_HERE = "; load: not measured (the engine was open before the report began)"


def memory_in_use(device: str) -> int | None:
    """Bytes in use: the process's resident memory (CPU), or the whole device's (CUDA); None if unreadable."""
    if not device.startswith("cuda"):
        return _proc_status_bytes("VmRSS") or None
    try:
        import torch

        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
    except (ImportError, RuntimeError):  # no PyTorch CUDA build: not measured, rather than a wrong figure
        return None
    return total - free


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets the process's peak RSS (VmHWM), Linux >= 4.0
            f.write("5")
    except OSError:
        pass


def _difference(after: int | None, before: int | None) -> int | None:
    return after - before if after is not None and before is not None else None


def _proc_status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return 0


def _request(pipe: Pipeline, image, question: str, new_tokens: int) -> Request:
    image = image or default_latency_image()
    encoded = pipe.encode_request(PipelineRequest(image, pipe.chat_prompt(question), new_tokens))
    return Request(encoded.input_ids[None], encoded.pixel_values[None], new_tokens, encoded)


def default_latency_image():
    """scikit-image's cat photograph (ships offline with scikit-image)."""
    import skimage.data
    from PIL import Image

    return Image.fromarray(skimage.data.chelsea())


def _check_comparable(pruned: Pipeline, baseline: Pipeline) -> None:
    a, b = pruned.manifest.onnx_set, baseline.manifest.onnx_set
    if a.model.fingerprint != b.model.fingerprint or a.prompt != b.prompt:
        raise ArtifactMismatchError("The two engines come from different models or prompt layouts; their latencies "
                                    "do not compare.", "Export both from the same --model (the baseline without "
                                    "--recipe) and build them the same way.")


def _engine_facts(pipe: Pipeline) -> dict[str, Any]:
    m = pipe.manifest
    return {"backend": m.backend, "device": pipe.runner.device, "dtype": m.onnx_set.dtype,
            "recipe_method": m.onnx_set.recipe.method, "removed": list(m.onnx_set.recipe.removed),
            "kept_after_last_layer": m.onnx_set.recipe.keep[-1], "target": m.onnx_set.target,
            "session": getattr(pipe.runner, "session_facts", None)}


def _ratios(prompt_tokens: int, num_visual: int, engines: dict[str, dict[str, Any]],
            pipes: dict[str, Pipeline]) -> LatencyRatios:
    """FLOPs at the request's own N (LLaVA-NeXT: the counts the recipe gives that image) next to the latencies."""
    from dataclasses import replace

    from calibrate.flops import visual_flops
    from calibrate.recipe import counts_at
    from engines.torch_static import engine_recipe

    shape = replace(pipes["pruned"].manifest.onnx_set.language_model, num_visual_tokens=num_visual)
    text = prompt_tokens - num_visual
    recipes = {name: engine_recipe(pipe.manifest.onnx_set) for name, pipe in pipes.items()}

    def flops(name: str, extra: float = 0.0) -> float:
        before, removed = counts_at(recipes[name], num_visual)
        return visual_flops(shape, removed, extra, before, METHODS[recipes[name].method].cuts_after_layer)

    lm = flops("pruned", text) / flops("baseline", text)
    visual = flops("pruned") / flops("baseline")
    e = engines
    prefill = e["pruned"]["prefill"]["p50_ms"] / e["baseline"]["prefill"]["p50_ms"]
    decode = (e["pruned"]["decode_per_token"]["p50_ms"] / e["baseline"]["decode_per_token"]["p50_ms"]
              if e["pruned"]["decode_per_token"] else None)
    return LatencyRatios(lm_flops_ratio=lm, visual_flops_ratio=visual, prefill_latency_ratio=prefill,
                         prefill_latency_over_flops=prefill / lm, prefill_speedup=1 / prefill,
                         ttft_ratio=e["pruned"]["ttft"]["p50_ms"] / e["baseline"]["ttft"]["p50_ms"],
                         decode_latency_ratio=decode,
                         kv_bytes_ratio=e["pruned"]["kv_bytes_prefill"] / e["baseline"]["kv_bytes_prefill"],
                         lm_flops_text_tokens=text)


def _method(warmup: int, rounds: int, clock: Clock, load_before, pipe: Pipeline) -> dict[str, Any]:
    return {
        "warmup_requests": max(warmup, 1), "rounds": rounds, "timed_requests_per_engine": rounds,
        "per_visit": "1 untimed + 1 timed request; engine order alternates between rounds",
        "clock": getattr(clock, "__qualname__", repr(clock)),
        "synchronization": "each phase ends with host arrays (logits / features copied back), so stamps follow "
                           "the device work",
        "ttft": "preprocessed inputs -> vision -> embed -> prefill, whose logits give the first token",
        "statistic": "p50 and p90 over timed requests (decode: over every step of every timed request)",
        "device": _device_description(pipe.runner.device), "load_average_1min_before": load_before,
        "versions": tool_versions("torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "transformers"),
        "python": platform.python_version(),
    }


def _device_description(device: str) -> dict[str, Any]:
    facts: dict[str, Any] = {"kind": device, "cpu": _cpu_model(), "cpu_count": os.cpu_count()}
    if device.startswith("cuda"):
        from engines.tensorrt import gpu_identity

        facts["gpu"] = gpu_identity()
    return facts


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def latency_markdown(latency: LatencyReport) -> str:
    report = model_dump(latency)
    e, r, m, q = report["engines"], report["ratios"], report["method"], report["request"]
    rows = [("vision p50", "vision", "p50_ms"), ("prefill p50", "prefill", "p50_ms"),
            ("prefill p90", "prefill", "p90_ms"), ("TTFT p50", "ttft", "p50_ms"), ("TTFT p90", "ttft", "p90_ms")]
    lines = ["# Latency report", "",
             f"One request: {q['prompt_tokens']} prompt tokens ({q['visual_tokens']} visual), {q['new_tokens']} new "
             f"tokens. Pruned: {e['pruned']['backend']} on {e['pruned']['device']}, {e['pruned']['dtype']}, "
             f"{e['pruned']['recipe_method']} keeping {e['pruned']['kept_after_last_layer']} visual tokens after the "
             f"last pruning layer. Baseline: {e['baseline']['backend']}, {e['baseline']['recipe_method']}.", "",
             "| metric | pruned | baseline | ratio |", "|---|---:|---:|---:|"]
    for label, phase, stat in rows:
        a, b = e["pruned"][phase][stat], e["baseline"][phase][stat]
        lines.append(f"| {label} (ms) | {a:.2f} | {b:.2f} | {a / b:.3f} |")
    if e["pruned"]["decode_per_token"]:
        a, b = e["pruned"]["decode_per_token"]["p50_ms"], e["baseline"]["decode_per_token"]["p50_ms"]
        lines.append(f"| decode per token p50 (ms) | {a:.2f} | {b:.2f} | {a / b:.3f} |")
        lines.append(f"| decode tokens/s | {e['pruned']['decode_tokens_per_s']:.1f} | "
                     f"{e['baseline']['decode_tokens_per_s']:.1f} | |")
    for label, key in (("KV cache after prefill (bytes)", "kv_bytes_prefill"), ("KV cache at the end (bytes)", "kv_bytes_final")):
        a, b = e["pruned"][key], e["baseline"][key]
        lines.append(f"| {label} | {a:,} | {b:,} | {a / b:.3f} |")
    for label, key in (("engine files (MiB)", "engine_file_bytes"), ("memory taken by loading (MiB)", "load_bytes"),
                       ("working memory of requests (MiB)", "working_bytes")):
        a, b = e["pruned"]["memory"][key], e["baseline"]["memory"][key]
        lines.append(f"| {label} | {_mib(a)} | {_mib(b)} | {a / b if a and b else float('nan'):.3f} |")
    lines += ["", f"**Prefill latency ratio {r['prefill_latency_ratio']:.3f} vs. whole-LM FLOPs ratio "
              f"{r['lm_flops_ratio']:.3f}** (latency / FLOPs = {r['prefill_latency_over_flops']:.3f}; visual-only "
              f"FLOPs ratio {r['visual_flops_ratio']:.3f}; prefill speedup {r['prefill_speedup']:.2f}x).", "",
              "## Method", "",
              f"- {m['warmup_requests']} warm-up requests per engine, then {m['rounds']} rounds; {m['per_visit']}.",
              f"- TTFT: {m['ttft']}. Synchronization: {m['synchronization']}.",
              f"- Statistic: {m['statistic']}. Clock: `{m['clock']}`.",
              f"- Memory: {e['pruned']['memory']['method']}.",
              f"- Engines: export target {e['pruned'].get('target')} / {e['baseline'].get('target')}; session "
              f"options {e['pruned'].get('session')} / {e['baseline'].get('session')} (pruned / baseline).",
              f"- Device: {m['device']}; 1-min load average before timing: {m['load_average_1min_before']}.",
              f"- Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items() if v != 'not installed')}; "
              f"Python {m['python']}.", ""]
    return "\n".join(lines)


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def plot_latency(report: LatencyReport, out: Path) -> None:
    """Left: p50 per phase, pruned vs. baseline. Right: latency ratio vs. FLOPs ratio (the diagonal is 'as fast
    as the FLOPs say')."""
    plt = pyplot()
    e, r = report.engines, model_dump(report.ratios)
    phases = [p for p in ("vision", "prefill", "ttft", "decode_per_token") if e["pruned"][p]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    x = np.arange(len(phases))
    for offset, name in ((-0.2, "baseline"), (0.2, "pruned")):
        left.bar(x + offset, [e[name][p]["p50_ms"] for p in phases], 0.4, label=name)
    left.set_xticks(x, [p.replace("_", " ") for p in phases])
    left.set_ylabel("p50 latency (ms)")
    left.set_title("Latency per phase")
    left.legend()
    right.plot([0, 1], [0, 1], color="grey", linestyle="--", label="latency = FLOPs")
    right.scatter([r["lm_flops_ratio"]], [r["prefill_latency_ratio"]], s=60, zorder=3, label="prefill")
    right.scatter([r["lm_flops_ratio"]], [r["ttft_ratio"]], s=60, marker="s", zorder=3, label="TTFT")
    right.set_xlim(0, 1.05)
    right.set_ylim(0, 1.2)
    right.set_xlabel("whole-LM FLOPs ratio (pruned / baseline)")
    right.set_ylabel("latency ratio (p50)")
    right.set_title("Latency vs. FLOPs")
    right.grid(alpha=0.3)
    right.legend()
    save_figure(fig, out)
