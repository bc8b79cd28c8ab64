"""One command on a GPU host: what this project can verify there, the quick path in a few minutes on one H100/H200.

    make gpu-check            # the host's own python3 (its CUDA PyTorch), PYTHONPATH=., no install step
    make gpu-check FULL=1     # also the ONNX exports, engine folders, the 7B benchmark and `pytest -m gpu`

Needs PyTorch with CUDA, transformers and onnx as a CUDA image has them, plus pure-Python wheels where missing
(pydantic and its core, polygraphy). Each step is timed; a failing step is recorded with its error while the next
one runs; the results are written after every step, so a time-out loses nothing; what is skipped says why.

Quick path (no ONNX export, which takes about a minute per set on a host's CPU):
1. environment: GPU, versions, ONNX Runtime providers, TensorRT;
2. the PyTorch engine (engines/torch_static.py) of tiny's 60 % FitPrune recipe on CUDA, compiled and replayed as
   CUDA graphs, float32 and float16, against the eager model on the same device: logits, kept indices, decode;
3. every method's engine captured as CUDA graphs (eager kernels: proves no host sync) against eager;
4. calibration of tiny on CUDA (float16) against the CPU on the same 16 samples.
FULL adds: 5. ONNX sets exported for both targets, a `visprune build --backend pytorch --device cuda` engine folder
and its parity report; ONNX Runtime CUDA (with per-node placement) and TensorRT engines where installed;
6. bench/gpu_engine_7b.py; 7. `pytest -m gpu`.

Results: bench/results/gpu_check.{json,md} (--out to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
TINY_IMAGE_START = 5  # any offset works: the check feeds embeddings directly


def run_step(results: dict[str, Any], name: str, fn: Callable[[], Any], out: Path) -> None:
    start = time.perf_counter()
    try:
        results[name] = {"ok": True, **fn()}
    except Exception as e:  # recorded, and the next step runs
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:600], "where": traceback.format_exc(limit=4)}
    results[name]["seconds"] = round(time.perf_counter() - start, 1)
    print(f"[{results[name]['seconds']:6.1f} s] {name}: {'ok' if results[name]['ok'] else results[name]['error']}",
          flush=True)
    write_results(results, out)


def skip(results: dict[str, Any], name: str, why: str, out: Path) -> None:
    results[name] = {"ok": True, "skipped": why, "seconds": 0.0}
    print(f"[  skip  ] {name}: {why}", flush=True)
    write_results(results, out)


def environment() -> dict[str, Any]:
    import torch

    from visprune.artifacts import tool_versions

    try:
        import onnxruntime
        providers = onnxruntime.get_available_providers()
    except ImportError:
        providers = []
    try:
        import tensorrt
        trt = tensorrt.__version__
    except ImportError:
        trt = None
    return {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "ort_providers": providers,
            "tensorrt": trt, "python": platform.python_version(),
            "versions": tool_versions("torch", "transformers", "triton", "onnx", "onnxruntime", "onnxruntime-gpu",
                                      "pydantic")}


def tiny_model(dtype):
    from visprune.models import load_llava

    return load_llava("tiny", device="cuda", dtype=dtype).model


def engine_vs_eager(model, recipe, compile: bool, steps: int = 4) -> dict[str, Any]:
    """The static engine (batch size 2, two buckets) against the eager modules on the same device: a padded batch
    of two prompts of different lengths, then `steps` decode steps."""
    import torch

    from engines.torch_static import StaticShapes, StaticTorchEngine
    from exporter.pruned_lm import LlamaDecodeStep, PrunedLlamaPrefill
    from visprune.models.decoder import EAGER

    start = time.perf_counter()
    engine = StaticTorchEngine(model, recipe, TINY_IMAGE_START, "cuda", StaticShapes((600, 640), (2,), steps + 1),
                               compile=compile, cuda_graphs=True)
    build_s = time.perf_counter() - start
    seq, hidden = 600, model.config.text_config.hidden_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    embeds = torch.randn(2, seq, hidden, device="cuda", generator=gen).to(model.dtype)
    starts, pads = torch.tensor([5, 9], device="cuda"), torch.tensor([0, 4], device="cuda")
    scores = torch.rand(2, 576, device="cuda", generator=gen) if recipe.method == "visionzip" else None
    with torch.no_grad():
        ref_logits, past, ref_kept = PrunedLlamaPrefill(model, recipe, TINY_IMAGE_START, EAGER)(embeds, starts, pads,
                                                                                                   scores)
        padded = torch.cat([torch.zeros(2, 40, hidden, device="cuda", dtype=model.dtype), embeds], 1)
        logits, kept = engine.prefill(2, 640, padded, starts + 40, pads + 40, scores)
        errors = [float((logits - ref_logits).abs().max())]
        overlap = min(len(set(a.tolist()) & set(b.tolist())) / len(b) for k, r in zip(kept, ref_kept)
                      for a, b in zip(k, r))
        decode = LlamaDecodeStep(model, EAGER)
        token = torch.randn(2, 1, hidden, device="cuda", generator=gen).to(model.dtype)
        for step in range(steps):
            position = torch.stack([torch.tensor([seq + step]), torch.tensor([seq - 4 + step])]).cuda()
            ref, past = decode(token, position, pads, past)
            got = engine.decode(2, token, position, pads + 40, torch.tensor([640 + step], device="cuda"))
            errors.append(float((got - ref).abs().max()))
    scale = float(ref_logits.abs().max())
    return {"build_s": round(build_s, 1), "max_abs_logits_error": max(errors), "logits_scale": scale,
            "min_kept_overlap": overlap, "kept_equal": overlap == 1.0}


def compiled_engines() -> dict[str, Any]:
    """Judged as parity reports judge (reports/parity.py): logits only where both kept the same tokens, since a
    float16 near-tie that flips one kept token legitimately moves the logits; else the kept-index overlap."""
    import torch

    from calibrate.recipe import Recipe
    from conftest import TINY_RECIPE_60

    recipe = Recipe("fitprune", 576, TINY_RECIPE_60)
    out = {}
    for dtype, atol, overlap in ((torch.float32, 1e-3, 1.0), (torch.float16, 0.1, 0.9)):
        row = engine_vs_eager(tiny_model(dtype), recipe, compile=True)
        row["logits_judged"] = row["kept_equal"]
        row["passed"] = row["min_kept_overlap"] >= overlap and (not row["kept_equal"] or
                                                                row["max_abs_logits_error"] <= atol)
        out[str(dtype).removeprefix("torch.")] = row
    if not all(row["passed"] for row in out.values()):
        raise AssertionError(f"compiled CUDA-graph engine differs from eager: {json.dumps(out)}")
    return out


def every_method_captured() -> dict[str, Any]:
    import torch

    from calibrate.recipe import Recipe
    from calibrate.stage import budget_recipe
    from conftest import TINY_RECIPE_60
    from visprune.methods import MAIN_METHODS

    from visprune.models.llava import LanguageModelShape

    model = tiny_model(torch.float32)
    shape = LanguageModelShape.from_config(model.config)
    out = {}
    for method in MAIN_METHODS:
        if method in ("fitprune", "random"):
            recipe = Recipe(method, 576, TINY_RECIPE_60, seed=0 if method == "random" else None)
        else:
            recipe = budget_recipe(shape, 0.6, method)
        out[method] = engine_vs_eager(model, recipe, compile=False)
    bad = {m: r for m, r in out.items() if r["max_abs_logits_error"] > 1e-3 or not r["kept_equal"]}
    if bad:
        raise AssertionError(f"CUDA-graph replay differs from eager for {sorted(bad)}: {json.dumps(bad)}")
    return out


def calibration(work: Path) -> dict[str, Any]:
    from calibrate import CalibrationConfig, calibrate

    out: dict[str, Any] = {}
    for device in ("cpu", "cuda"):
        result = calibrate(CalibrationConfig(model="tiny", reduction=0.6, samples=16, device=device),
                           work / f"calibrate-{device}.json", plot=False, progress=False)
        out[device] = {"removed": result.recipe.removed, "seconds": result.timings["total_s"]}
    out["tokens_moved_cpu_vs_cuda"] = sum(abs(a - b) for a, b in zip(out["cpu"]["removed"], out["cuda"]["removed"]))
    return out


def exported_sets(work: Path) -> dict[str, Any]:
    """tiny with the tests' 60 % recipe: float32 (onnxruntime target) and float16 (tensorrt target)."""
    from conftest import TINY_RECIPE_60
    from exporter import ExportConfig, export_onnx

    recipe = work / "recipe.json"
    recipe.write_text(json.dumps({"method": "fitprune", "num_visual_tokens": 576, "removed": TINY_RECIPE_60}))
    for dtype, target in (("float32", "onnxruntime"), ("float16", "tensorrt")):
        export_onnx(ExportConfig(model="tiny", recipe=recipe, dtype=dtype, target=target), work / f"onnx-{dtype}",
                    progress=False)
    return {"sets": ["onnx-float32", "onnx-float16"]}


def engine_folder_parity(work: Path, onnx: str, name: str, config, reference: str) -> dict[str, Any]:
    from engines import build_engine
    from reports.parity import default_parity_prompts, parity_report

    start = time.perf_counter()
    build_engine(config, work / onnx, work / name)
    build_s = round(time.perf_counter() - start, 1)
    report = parity_report(work / name, "tiny", work / f"report-{name}", prompts=default_parity_prompts(4),
                           max_new_tokens=6, allow_failure=True, reference=reference)
    verdict = report.engine_vs_reference.model_dump()
    return {"build_s": build_s, **{k: verdict[k] for k in ("passed", "failures", "reference", "max_abs_logits_error",
                                                            "min_kept_overlap", "min_teacher_forced_top1")}}


def optional_engines(work: Path) -> dict[str, Any]:
    import onnxruntime

    from engines import BuildConfig

    out: dict[str, Any] = {}
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        out["onnxruntime cuda float32"] = engine_folder_parity(work, "onnx-float32", "ort-cuda",
                                                               BuildConfig(device="cuda"), "auto")
        out["onnxruntime node placement"] = ort_placement(work / "ort-cuda")
    else:
        out["onnxruntime cuda"] = "skipped: this onnxruntime has no CUDAExecutionProvider"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        out["tensorrt float16"] = "skipped: tensorrt is not installed"
        return out
    for method_set in ("onnx-float16",):
        out["tensorrt float16"] = engine_folder_parity(
            work, method_set, "trt-fp16", BuildConfig(backend="tensorrt", max_prompt_tokens=700, max_new_tokens=16,
                                                      max_batch=1), "auto")
    return out


def ort_placement(engine: Path) -> dict[str, Any]:
    """Which provider ran each node of the CUDA prefill graph (from an ORT profile): heavy ops must not be on CPU."""
    import numpy as np

    from engines.build import check_node_placement, node_placement

    feeds = {"inputs_embeds": np.zeros((1, 600, 64), np.float32), "image_starts": np.array([5]),
             "pad_lengths": np.array([0])}
    placement = node_placement(engine / "prefill.onnx", ["CUDAExecutionProvider", "CPUExecutionProvider"], feeds)
    check_node_placement(placement, "cuda")
    return {provider: len(nodes) for provider, nodes in placement.items()}


def command(args: list[str], timeout: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    if done.returncode:
        raise RuntimeError(f"exit {done.returncode}: {' / '.join(tail[-3:])}")
    return {"exit_code": done.returncode, "tail": tail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--full", action="store_true", help="also exports, engine folders, the 7B bench, pytest -m gpu")
    parser.add_argument("--bench-budget-s", type=float, default=420, help="the 7B benchmark's time budget (--full)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU is visible to this PyTorch: run this on a GPU host with PyTorch's CUDA build.")
    results: dict[str, Any] = {}
    out = args.out
    run_step(results, "environment", environment, out)
    run_step(results, "compiled CUDA-graph engine vs eager (fitprune, fp32 and fp16)", compiled_engines, out)
    run_step(results, "every method replayed as a CUDA graph vs eager", every_method_captured, out)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run_step(results, "calibration cuda vs cpu", lambda: calibration(work), out)
        if not args.full:
            for name in ("ONNX export, engine folders, ORT CUDA / TensorRT", "7B benchmark", "pytest -m gpu"):
                skip(results, name, "quick path (make gpu-check FULL=1 runs it)", out)
            return
        full_path(results, work, args, out)


def full_path(results: dict[str, Any], work: Path, args, out: Path) -> None:
    from engines import BuildConfig

    run_step(results, "export tiny (float32, float16)", lambda: exported_sets(work), out)
    run_step(results, "pytorch engine folder (cuda, float16) parity", lambda: engine_folder_parity(
        work, "onnx-float16", "torch-fp16", BuildConfig(backend="pytorch", device="cuda", max_prompt_tokens=700,
                                                        max_new_tokens=16, max_batch=1), "auto"), out)
    run_step(results, "onnxruntime cuda and tensorrt", lambda: optional_engines(work), out)
    run_step(results, "7B benchmark", lambda: command(["bench/gpu_engine_7b.py", "--budget-s", str(args.bench_budget_s),
                                                        "--out", str(out)], timeout=int(args.bench_budget_s) + 300), out)
    run_step(results, "pytest -m gpu", lambda: command(["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
                                                       timeout=600), out)


def write_results(results: dict[str, Any], out: Path) -> None:
    from visprune.artifacts import atomic_write_bytes, atomic_write_json

    atomic_write_json(out / "gpu_check.json", results)
    lines = ["# GPU check", "", f"Environment: {json.dumps(results.get('environment', {}))}", "",
             "| step | ok | seconds | figures |", "|---|---|---:|---|"]
    for name, step in results.items():
        if name == "environment":
            continue
        figures = {k: v for k, v in step.items() if k not in ("ok", "seconds", "where")}
        lines.append(f"| {name} | {'yes' if step['ok'] else 'NO'} | {step['seconds']} | "
                     f"`{json.dumps(figures)[:900]}` |")
    atomic_write_bytes(out / "gpu_check.md", ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
