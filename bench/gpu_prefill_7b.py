"""Prefill latency of the PyTorch backend at LLaVA-1.5-7B shapes: unpruned vs. the shipped 60 % FitPrune recipe.

Random weights (the latency of a matrix product does not depend on its values), float16, batch 1, one image of
576 visual tokens and --text-tokens text tokens (prefix of 5 before the image, as llava-hf's template puts it, the
rest after). The model is the language model `runtime.torch_runner.TorchRunner` runs: exporter/pruned_lm.py's
PrunedLlamaPrefill with the recipe's keep counts, eager (and torch.compile with --compile).

Timing: --warmup untimed runs, then --runs timed runs per recipe in alternating rounds; each run is bracketed by
torch.cuda.synchronize() and timed with time.perf_counter (CUDA events give the same within noise on one stream).
Next to the latency ratio: the whole-LM FLOPs ratio at the same text length (calibrate.flops), and whether this
machine's onnxruntime has the CUDA provider.

    .venv/bin/python bench/gpu_prefill_7b.py                       # on a GPU host: H100/H200, ~2 min
    .venv/bin/python bench/gpu_prefill_7b.py --device cpu --layers 2 --runs 3 --out /tmp/g   # smoke test on CPU

Results: bench/results/gpu_prefill_7b.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calibrate.flops import visual_flops  # noqa: E402
from calibrate.recipe import load_recipe, unpruned_recipe  # noqa: E402
from exporter.pruned_lm import PrunedLlamaPrefill  # noqa: E402
from visprune.artifacts import tool_versions  # noqa: E402
from visprune.models.llava import LanguageModelShape, llava_1_5_7b_config  # noqa: E402

IMAGE_START = 5


def build_model(layers: int, device: str, dtype: torch.dtype):
    from transformers import LlavaForConditionalGeneration

    config = llava_1_5_7b_config()
    config.text_config.num_hidden_layers = layers
    config.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval(), config


def truncate(removed: list[int], layers: int) -> list[int]:
    return list(removed[:layers]) + [0] * max(0, layers - len(removed))


def time_prefills(modules: dict, embeds: torch.Tensor, warmup: int, runs: int, device: str) -> dict[str, list[float]]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        for module in modules.values():
            for _ in range(warmup):
                module(embeds)
        samples = {name: [] for name in modules}
        names = list(modules)
        for r in range(runs):
            for name in names if r % 2 == 0 else names[::-1]:
                sync()
                start = time.perf_counter()
                modules[name](embeds)
                sync()
                samples[name].append(time.perf_counter() - start)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = LLaVA-1.5-7B)")
    parser.add_argument("--text-tokens", type=int, default=60)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes/llava-1.5-7b/fitprune-60.json")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd modules")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = parser.parse_args()

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    model, config = build_model(args.layers, args.device, dtype)
    recipe = load_recipe(args.recipe)
    recipe.removed = truncate(recipe.removed, args.layers)
    shape = LanguageModelShape.from_config(config)
    modules = {"unpruned": PrunedLlamaPrefill(model, unpruned_recipe(shape), IMAGE_START).eval(),
               "fitprune-60": PrunedLlamaPrefill(model, recipe, IMAGE_START).eval()}
    if args.compile:
        modules.update({f"{name} (compiled)": torch.compile(m) for name, m in list(modules.items())})
    seq = 576 + args.text_tokens
    embeds = torch.randn(1, seq, shape.hidden_size, generator=torch.Generator().manual_seed(0)).to(args.device, dtype)
    samples = time_prefills(modules, embeds, args.warmup, args.runs, args.device)

    text = args.text_tokens
    flops_ratio = visual_flops(shape, recipe.removed, text) / visual_flops(shape, [], text)
    rows = {name: {"p50_ms": 1e3 * float(np.percentile(s, 50)), "p90_ms": 1e3 * float(np.percentile(s, 90)),
                   "n": len(s)} for name, s in samples.items()}
    base = rows["unpruned"]["p50_ms"]
    for row in rows.values():
        row["latency_ratio"] = row["p50_ms"] / base
    result = {
        "what": "PyTorch backend prefill, LLaVA-1.5-7B shapes, random weights, batch 1",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "dtype": str(dtype), "layers": args.layers, "prompt_tokens": seq, "visual_tokens": 576,
        "recipe": {"file": str(args.recipe.relative_to(REPO)), "removed": recipe.removed},
        "lm_flops_ratio": flops_ratio, "results": rows, "onnxruntime_providers": _ort_providers(),
        "method": {"warmup": args.warmup, "runs": args.runs, "order": "alternating rounds",
                   "sync": "torch.cuda.synchronize before and after each run", "clock": "time.perf_counter"},
        "versions": tool_versions("torch", "transformers", "onnxruntime", "onnxruntime-gpu"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_prefill_7b.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gpu_prefill_7b.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _ort_providers() -> list[str]:
    try:
        import onnxruntime

        return onnxruntime.get_available_providers()
    except ImportError:
        return []


def markdown(result: dict) -> str:
    lines = [f"# {result['what']}", "",
             f"{result['device']}, {result['dtype']}, {result['layers']} layers, {result['prompt_tokens']} prompt tokens "
             f"({result['visual_tokens']} visual). Recipe `{result['recipe']['file']}`. "
             f"Whole-LM FLOPs ratio {result['lm_flops_ratio']:.3f}.", "",
             "| model | p50 ms | p90 ms | latency ratio | latency / FLOPs |", "|---|---:|---:|---:|---:|"]
    for name, row in result["results"].items():
        flops = 1.0 if name.startswith("unpruned") else result["lm_flops_ratio"]
        lines.append(f"| {name} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['latency_ratio']:.3f} | "
                     f"{row['latency_ratio'] / flops:.3f} |")
    lines += ["", f"onnxruntime providers on this machine: {', '.join(result['onnxruntime_providers']) or 'none'}",
              f"Method: {result['method']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
