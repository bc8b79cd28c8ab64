"""One command on a GPU host: everything this project can verify there, in a few minutes on one H100/H200.

    make gpu-check            # the host's own python3 (its CUDA PyTorch), PYTHONPATH=., no install step

Needs PyTorch with CUDA, transformers, onnx, onnxscript, onnxruntime, pydantic and polygraphy (pure-Python
wheels: carry them to an offline host); adds the ONNX Runtime CUDA and
TensorRT checks where onnxruntime-gpu / tensorrt are installed (skipped with the reason otherwise). Each step is
timed, and a failing step is recorded with its error while the next one runs:

1. environment: GPU, driver, versions, ONNX Runtime providers, TensorRT;
2. parity of the PyTorch backend on CUDA (float32 eager, float16 eager, float16 torch.compile) against the
   float32 CPU reference, under the criteria of each dtype (runtime/parity.py CRITERIA);
3. an ONNX Runtime CUDA float32 engine and a TensorRT float16 engine against their auto reference;
4. calibration of tiny on CUDA (float16) against the CPU on the same 16 samples, and its time on all 64;
5. bench/gpu_prefill_7b.py: LLaVA-1.5-7B shapes (32 layers, float16), pruned vs unpruned prefill latency next to
   the FLOPs ratio;
6. `pytest -m gpu`.

Results: bench/results/gpu_check.{json,md} (--out to change). `--quick` skips steps 5 and 6.
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


def run_step(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    start = time.perf_counter()
    try:
        results[name] = {"ok": True, **fn()}
    except Exception as e:  # recorded, and the next step runs
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "where": traceback.format_exc(limit=3)}
    results[name]["seconds"] = round(time.perf_counter() - start, 1)
    print(f"[{results[name]['seconds']:6.1f} s] {name}: {'ok' if results[name]['ok'] else results[name]['error']}",
          flush=True)


def environment() -> dict[str, Any]:
    import onnxruntime
    import torch

    from visprune.artifacts import tool_versions

    try:
        import tensorrt
        trt = tensorrt.__version__
    except ImportError:
        trt = None
    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cuda": torch.version.cuda, "ort_providers": onnxruntime.get_available_providers(), "tensorrt": trt,
            "python": platform.python_version(),
            "versions": tool_versions("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "pydantic")}


def exported_sets(work: Path) -> list[Path]:
    """tiny with the tests' 60 % recipe, exported in float32 (onnxruntime target) and float16 (tensorrt target),
    as `onnx-{dtype}` in `work`."""
    from conftest import TINY_RECIPE_60
    from exporter import ExportConfig, export_onnx

    recipe = work / "recipe.json"
    recipe.write_text(json.dumps({"method": "fitprune", "num_visual_tokens": 576, "removed": TINY_RECIPE_60}))
    # float32 for ONNX Runtime (its target: opset-23 fused ops, also on CUDA), float16 for TensorRT (its target)
    for dtype, target in (("float32", "onnxruntime"), ("float16", "tensorrt")):
        export_onnx(ExportConfig(model="tiny", recipe=recipe, dtype=dtype, target=target), work / f"onnx-{dtype}",
                    progress=False)
    return [work / "onnx-float32", work / "onnx-float16"]


def parity_of(engine: Path, work: Path, reference: str) -> dict[str, Any]:
    from runtime.parity import default_parity_prompts, parity_report

    report = parity_report(engine, "tiny", work / f"report-{engine.name}", prompts=default_parity_prompts(8),
                           max_new_tokens=8, allow_failure=True, reference=reference)
    verdict = report["engine_vs_reference"]
    keys = ("passed", "failures", "reference", "criteria", "max_abs_logits_error", "max_logits_error_over_atol",
            "logits_judged_prompts", "min_kept_overlap", "max_kept_mismatches", "min_teacher_forced_top1",
            "decisive_flips", "near_tie_flips")
    return {key: verdict[key] for key in keys}


def build_and_compare(onnx: Path, work: Path, name: str, config, reference: str = "auto") -> dict[str, Any]:
    from engines import build_engine

    start = time.perf_counter()
    manifest = build_engine(config, onnx, work / name)
    build_s = round(time.perf_counter() - start, 1)
    return {"build_s": build_s, "tf32": manifest.tf32, **parity_of(work / name, work, reference)}


def optional_engines(sets: dict[str, Path], work: Path) -> dict[str, Any]:
    import onnxruntime

    from engines import BuildConfig

    out: dict[str, Any] = {}
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        out["onnxruntime cuda float32"] = build_and_compare(sets["float32"], work, "ort-cuda", BuildConfig(device="cuda"))
    else:
        out["onnxruntime cuda float32"] = "skipped: this onnxruntime has no CUDAExecutionProvider"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        out["tensorrt float16"] = "skipped: tensorrt is not installed"
        return out
    config = BuildConfig(backend="tensorrt", max_prompt_tokens=700, max_new_tokens=16)
    out["tensorrt float16"] = build_and_compare(sets["float16"], work, "trt-fp16", config)
    return out


def calibration(work: Path) -> dict[str, Any]:
    from calibrate import CalibrationConfig, calibrate

    out: dict[str, Any] = {}
    for device, samples in (("cpu", 16), ("cuda", 16), ("cuda", 64)):
        result = calibrate(CalibrationConfig(model="tiny", reduction=0.6, samples=samples, device=device),
                           work / f"calibrate-{device}-{samples}.json", plot=False, progress=False)
        out[f"{device} {samples} samples"] = {"removed": result.recipe.removed, "seconds": result.timings["total_s"],
                                              "visual_flops_reduction": result.recipe.achieved["visual_flops_reduction"]}
    cpu, cuda = out["cpu 16 samples"]["removed"], out["cuda 16 samples"]["removed"]
    out["tokens_moved_cpu_vs_cuda"] = sum(abs(a - b) for a, b in zip(cpu, cuda))
    return out


def command(args: list[str], timeout: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    return {"exit_code": done.returncode, "tail": tail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--quick", action="store_true", help="skip the 7B prefill benchmark and pytest -m gpu")
    args = parser.parse_args()
    import torch

    from engines import BuildConfig

    if not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU is visible to this PyTorch: run this on a GPU host with PyTorch's CUDA build.")
    results: dict[str, Any] = {}
    run_step(results, "environment", environment)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sets = {"float32": work / "onnx-float32", "float16": work / "onnx-float16"}  # written by the next step
        run_step(results, "export tiny (float32, float16)", lambda: {"sets": [str(p) for p in exported_sets(work)]})
        for dtype, compile in (("float32", False), ("float16", False), ("float16", True)):
            name = f"pytorch cuda {dtype}{' compile' if compile else ''}"
            config = BuildConfig(backend="pytorch", device="cuda", torch_compile=compile)
            run_step(results, name, lambda c=config, d=dtype, n=name: build_and_compare(
                sets[d], work, n.replace(" ", "-"), c, reference="cpu"))
        run_step(results, "onnxruntime cuda and tensorrt", lambda: optional_engines(sets, work))
        run_step(results, "calibration cuda vs cpu", lambda: calibration(work))
    if not args.quick:
        run_step(results, "7B prefill latency", lambda: command(["bench/gpu_prefill_7b.py"], timeout=300))
        run_step(results, "pytest -m gpu", lambda: command(["-m", "pytest", "-m", "gpu", "-q", "-p",
                                                            "no:cacheprovider"], timeout=600))
    write_results(results, args.out)


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
                     f"`{json.dumps(figures)[:600]}` |")
    atomic_write_bytes(out / "gpu_check.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
