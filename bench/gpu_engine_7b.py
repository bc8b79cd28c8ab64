"""The PyTorch engine at LLaVA-1.5-7B shapes: prefill and decode of every method at 60 %, against Hugging Face.

Random weights (a matrix product's latency does not depend on its values), float16 on CUDA, one image of 576
visual tokens, 5 tokens before it and --text-tokens after (645 by default), batch 1 and --batch. In one process:

- the peer: transformers' Llama decoder with `sdpa` attention, unpruned, last-position logits (what users run);
- ours, for the unpruned model and each registered method at 60 % (engines/torch_static.py, bucket = the prompt):
  eager (SDPA kernels), compiled (torch.compile, no CUDA graph) and compiled + replayed as a CUDA graph;
- decode tokens/s of our CUDA-graphed decode step against transformers' `generate` with its static cache;
- the time to build each engine (compile and capture), peak GPU memory, and per configuration the launched
  kernels (CUDA) or ATen ops (CPU) of one eager prefill, split into GEMM, attention, selection (scores, TopK,
  gathers) and other.

Timing: --warmup untimed runs, then --runs timed runs per configuration, configurations interleaved round by
round; each run is bracketed by torch.cuda.synchronize() and timed with time.perf_counter. Results are written
after every configuration, so a time-out loses nothing; --budget-s skips what no longer fits (and says so).

    python3 bench/gpu_engine_7b.py                                   # on a GPU host (H100/H200)
    .venv/bin/python bench/gpu_engine_7b.py --device cpu --small --layers 4 --runs 2 --out /tmp/g   # CPU smoke

Results: bench/results/gpu_engine_7b.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calibrate.flops import visual_flops  # noqa: E402
from calibrate.recipe import Recipe, load_recipe, unpruned_recipe  # noqa: E402
from calibrate.stage import budget_recipe  # noqa: E402
from engines.torch_static import StaticShapes, StaticTorchEngine, default_batch_sizes, default_buckets  # noqa: E402
from exporter.pruned_lm import PrunedLlamaPrefill  # noqa: E402
from visprune.artifacts import tool_versions  # noqa: E402
from visprune.methods import MAIN_METHODS  # noqa: E402
from visprune.models.decoder import SDPA, SDPA_LSE  # noqa: E402
from visprune.models.llava import LanguageModelShape, llava_1_5_7b_config  # noqa: E402

IMAGE_START = 5
FITPRUNE_60 = REPO / "recipes/llava-1.5-7b/fitprune-60.json"


def build_model(layers: int, device: str, dtype: torch.dtype, small: bool):
    """LLaVA-1.5-7B's architecture with random weights (`small`: the same layers and tokens, narrow, for CPUs)."""
    from transformers import LlavaForConditionalGeneration

    config = llava_1_5_7b_config()
    text = config.text_config
    text.num_hidden_layers = layers
    if small:
        text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads = 256, 688, 4, 4
        text.head_dim = 64
    config._attn_implementation = text._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval(), config


def recipes(shape: LanguageModelShape, layers: int, methods: list[str]) -> dict[str, Recipe]:
    """unpruned, and each method at 60 %: FitPrune's shipped 7B recipe (its counts also for FitPrune(Random)),
    the others from the FLOPs budget."""
    fitprune = load_recipe(FITPRUNE_60)
    counts = (fitprune.removed[:layers] + [0] * layers)[:layers]
    out = {"unpruned": unpruned_recipe(shape)}
    for method in methods:
        if method in ("fitprune", "random"):
            out[method] = Recipe(method, 576, counts, seed=0 if method == "random" else None)
        else:
            out[method] = budget_recipe(shape, 0.6, method)
    return out


class Timer:
    """Interleaved p50 timing of named callables (each run synchronised on CUDA)."""

    def __init__(self, device: str, warmup: int, runs: int):
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.warmup, self.runs = warmup, runs

    def p50_ms(self, calls: dict[str, Callable[[], Any]]) -> dict[str, float]:
        with torch.no_grad():
            for call in calls.values():
                for _ in range(self.warmup):
                    call()
            samples: dict[str, list[float]] = {name: [] for name in calls}
            names = list(calls)
            for r in range(self.runs):
                for name in names if r % 2 == 0 else names[::-1]:
                    self.sync()
                    start = time.perf_counter()
                    calls[name]()
                    self.sync()
                    samples[name].append(time.perf_counter() - start)
        return {name: round(1e3 * float(np.percentile(s, 50)), 3) for name, s in samples.items()}


def prefill_inputs(batch: int, seq: int, hidden: int, device: str, dtype: torch.dtype, scores: bool):
    embeds = torch.randn(batch, seq, hidden, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    starts = torch.full((batch,), IMAGE_START, device=device)
    image_scores = torch.rand(batch, 576, generator=torch.Generator().manual_seed(1)).to(device) if scores else None
    return embeds, starts, torch.zeros_like(starts), image_scores


def kernel_split(fn: Callable[[], Any], device: str) -> dict[str, Any]:
    """Kernels (CUDA) or ATen ops (CPU) of one call, counted and, on CUDA, their GPU time by kind."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.startswith("cuda") else [ProfilerActivity.CPU]
    with torch.no_grad(), profile(activities=activities) as prof:
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    events = [e for e in prof.events() if (e.device_type.name == "CUDA") == device.startswith("cuda")]
    if not device.startswith("cuda"):
        events = [e for e in events if e.name.startswith("aten::") and e.cpu_parent is None]
    split: dict[str, float] = {}
    for e in events:
        kind = _kind(e.name)
        split[kind] = split.get(kind, 0.0) + (e.device_time if device.startswith("cuda") else 0.0) / 1e3
    return {"count": len(events), "topk": sum("topk" in e.name.lower() for e in events),
            "gpu_ms": {k: round(v, 3) for k, v in split.items()} if device.startswith("cuda") else None,
            "count_by_kind": {k: sum(_kind(e.name) == k for e in events) for k in split}}


def _kind(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("gemm", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::linear",
                            "aten::matmul", "aten::bmm", "sm90", "sm80")):
        return "gemm"
    if any(s in n for s in ("fmha", "flash", "attention", "efficient", "scaled_dot")):
        return "attention"
    if any(s in n for s in ("topk", "sort", "gather", "scatter", "index", "argmax", "logsumexp")):
        return "selection"
    return "other"


class Bench:
    def __init__(self, args):
        self.args, self.device = args, args.device
        self.dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
        self.model, config = build_model(args.layers, args.device, self.dtype, args.small)
        self.shape = LanguageModelShape.from_config(config)
        self.seq = IMAGE_START + 576 + args.text_tokens
        self.timer = Timer(args.device, args.warmup, args.runs)
        self.started = time.perf_counter()
        self.result: dict[str, Any] = {"what": "PyTorch engine at LLaVA-1.5-7B shapes, random weights",
                                       "environment": environment(args), "prompt_tokens": self.seq,
                                       "prefill": {}, "decode": {}, "builds": {}, "kernels": {}, "skipped": []}

    def over_budget(self, what: str) -> bool:
        if time.perf_counter() - self.started < self.args.budget_s:
            return False
        self.result["skipped"].append(f"{what}: --budget-s {self.args.budget_s} spent")
        return True

    def engine(self, recipe: Recipe, buckets: tuple[int, ...], batch_sizes: tuple[int, ...], kernels=SDPA,
               graphs: bool = True) -> tuple[StaticTorchEngine, float]:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine = StaticTorchEngine(self.model, recipe, IMAGE_START, self.device,
                                   StaticShapes(buckets, batch_sizes, self.args.decode_tokens + 1),
                                   compile=not self.args.no_compile, cuda_graphs=graphs, kernels=kernels)
        return engine, round(time.perf_counter() - start, 1)

    def peer_rows(self) -> None:
        peers = {f"transformers sdpa b{b}": self.hf_prefill(b) for b in (1, self.args.batch)}
        self.result["prefill"].update({name: {"eager": ms} for name, ms in self.timer.p50_ms(peers).items()})

    def hf_prefill(self, batch: int) -> Callable[[], Any]:
        lm, head = self.model.model.language_model, self.model.lm_head
        embeds = prefill_inputs(batch, self.seq, self.shape.hidden_size, self.device, self.dtype, False)[0]
        return lambda: head(lm(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -1])

    def prefill_row(self, name: str, recipe: Recipe, batch: int, kernels=SDPA) -> None:
        scores = recipe.method == "visionzip"
        inputs = prefill_inputs(batch, self.seq, self.shape.hidden_size, self.device, self.dtype, scores)
        engine, build_s = self.engine(recipe, (self.seq,), (batch,), kernels)
        eager = PrunedLlamaPrefill(self.model, recipe, IMAGE_START, kernels).eval()
        calls = {"eager": lambda: eager(*inputs),
                 "compiled": lambda: engine.prefill_module(*inputs),
                 "graphed": lambda: engine.prefill(batch, self.seq, *inputs)}
        if not engine.cuda_graphs:
            calls.pop("graphed")
        if self.args.no_compile:
            calls.pop("compiled")
        row = self.timer.p50_ms(calls)
        row.update(build_s=build_s, lm_flops_ratio=self.flops_ratio(recipe),
                   kernels=kernel_split(lambda: eager(*inputs), self.device))
        self.result["prefill"][f"{name} b{batch}"] = row
        del engine
        self.save()

    def flops_ratio(self, recipe: Recipe) -> float:
        """Whole-LM FLOPs of the recipe over unpruned, at this prompt's text tokens."""
        text = IMAGE_START + self.args.text_tokens
        pruned = visual_flops(self.shape, recipe.removed, text, recipe.removed_before_llm)
        return round(pruned / visual_flops(self.shape, [], text), 4)

    def decode_row(self, name: str, recipe: Recipe, batch: int) -> None:
        engine, build_s = self.engine(recipe, (self.seq,), (batch,))
        inputs = prefill_inputs(batch, self.seq, self.shape.hidden_size, self.device, self.dtype,
                                recipe.method == "visionzip")
        engine.prefill(batch, self.seq, *inputs)
        token = torch.randn(batch, 1, self.shape.hidden_size, device=self.device, dtype=self.dtype)
        pads = torch.zeros(batch, dtype=torch.long, device=self.device)
        steps = self.args.decode_tokens

        def run():
            for step in range(steps):
                position = torch.full((batch, 1), self.seq + step, device=self.device)
                engine.decode(batch, token, position, pads, position[0])
        ms = Timer(self.device, 1, 5).p50_ms({"decode": run})["decode"]
        self.result["decode"][f"{name} b{batch}"] = {"tokens_per_s": round(steps * 1e3 / ms, 1),
                                                      "ms_per_step": round(ms / steps, 3), "build_s": build_s}
        del engine
        self.save()

    def hf_decode(self, batch: int) -> None:
        """transformers' generate with its static cache (eager, as it ships) over the same prompt length."""
        from transformers import LlamaForCausalLM

        embeds = prefill_inputs(batch, self.seq, self.shape.hidden_size, self.device, self.dtype, False)[0]
        lm = self.model.model.language_model
        with torch.device("meta"):  # a causal-LM shell around the same decoder and head: no second copy of weights
            causal = LlamaForCausalLM(lm.config)
        causal.model, causal.lm_head = lm, self.model.lm_head
        causal.eval()
        steps = self.args.decode_tokens
        times = Timer(self.device, 1, 3).p50_ms({  # eager generate is slow: few runs
            "one": lambda: causal.generate(inputs_embeds=embeds, max_new_tokens=1, min_new_tokens=1, do_sample=False,
                                           cache_implementation="static", pad_token_id=0),
            "many": lambda: causal.generate(inputs_embeds=embeds, max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                                            do_sample=False, cache_implementation="static", pad_token_id=0)})
        per_step = (times["many"] - times["one"]) / steps
        self.result["decode"][f"transformers generate (static cache) b{batch}"] = {
            "tokens_per_s": round(1e3 / per_step, 1), "ms_per_step": round(per_step, 3)}
        self.save()

    def save(self) -> None:
        if self.device.startswith("cuda"):
            self.result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        self.result["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_engine_7b.json").write_text(json.dumps(self.result, indent=2) + "\n")
        (out / "gpu_engine_7b.md").write_text(markdown(self.result))


def environment(args) -> dict[str, Any]:
    cuda = args.device.startswith("cuda")
    return {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "dtype": "float16" if cuda else "float32", "layers": args.layers, "small": args.small,
            "text_tokens": args.text_tokens, "batch": args.batch, "runs": args.runs, "warmup": args.warmup,
            "versions": tool_versions("torch", "transformers", "triton"),
            "method": "interleaved rounds, torch.cuda.synchronize around each run, time.perf_counter, p50"}


def run(bench: Bench) -> None:
    """Most important first, so that a time budget cuts the least telling rows: the cold build of a full engine set
    (it pays the compile every later engine reuses), the peer, unpruned and FitPrune and a pre-LLM method at batch
    1, decode, then batch 8, the other methods and the kernel log-sum-exp variant."""
    args = bench.args
    all_recipes = recipes(bench.shape, args.layers, args.methods)
    step("build a full engine set (fitprune, default buckets)", bench, lambda: build_full_set(bench, all_recipes))
    step("prefill transformers", bench, lambda: bench.peer_rows())
    first = [name for name in ("unpruned", "fitprune", "visionzip") if name in all_recipes]
    for name in first:
        step(f"prefill {name} b1", bench, lambda n=name: bench.prefill_row(n, all_recipes[n], 1))
    for name in ("unpruned", "fitprune"):
        if name in all_recipes:
            step(f"decode {name} b1", bench, lambda n=name: bench.decode_row(n, all_recipes[n], 1))
    step("decode transformers b1", bench, lambda: bench.hf_decode(1))
    for name in args.batch_methods:
        if name in all_recipes:
            step(f"prefill {name} b{args.batch}", bench,
                 lambda n=name: bench.prefill_row(n, all_recipes[n], args.batch))
    for name, recipe in all_recipes.items():
        if name not in first:
            step(f"prefill {name} b1", bench, lambda n=name, r=recipe: bench.prefill_row(n, r, 1))
    if "fitprune" in all_recipes and bench.device.startswith("cuda"):
        step("prefill fitprune b1 (kernel log-sum-exp)", bench,
             lambda: bench.prefill_row("fitprune (kernel lse)", all_recipes["fitprune"], 1, SDPA_LSE))
    for name in ("unpruned", "fitprune"):
        if name in all_recipes:
            step(f"decode {name} b{args.batch}", bench,
                 lambda n=name: bench.decode_row(n, all_recipes[n], args.batch))


def build_full_set(bench: Bench, all_recipes: dict[str, Recipe]) -> None:
    """What `visprune build --backend pytorch` does for a 7B set: every default bucket and batch size."""
    if "fitprune" not in all_recipes or bench.args.no_full_build:
        return
    buckets = default_buckets(577, 1024)
    engine, seconds = bench.engine(all_recipes["fitprune"], buckets, default_batch_sizes(bench.args.batch))
    bench.result["builds"]["fitprune, all buckets"] = {"seconds": seconds, "buckets": list(buckets),
                                                       "batch_sizes": list(default_batch_sizes(bench.args.batch))}
    del engine
    bench.save()


def step(what: str, bench: Bench, fn: Callable[[], None]) -> None:
    if bench.over_budget(what):
        return
    start = time.perf_counter()
    try:
        fn()
        status = "ok"
    except Exception as e:  # recorded; the next configuration runs
        status = f"{type(e).__name__}: {str(e)[:300]}"
        bench.result.setdefault("errors", {})[what] = status
    if bench.device.startswith("cuda"):
        torch.cuda.empty_cache()
    print(f"[{time.perf_counter() - bench.started:7.1f} s] {what} ({time.perf_counter() - start:.1f} s): {status}",
          flush=True)
    bench.save()


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"# {result['what']}", "",
             f"{env['device']}, {env['dtype']}, {env['layers']} layers{' (narrow CPU variant)' if env['small'] else ''}, "
             f"{result['prompt_tokens']} prompt tokens (5 + 576 visual + {env['text_tokens']}). {env['method']}; "
             f"{env['runs']} runs after {env['warmup']} warm-ups. Elapsed {result.get('elapsed_s')} s, peak GPU memory "
             f"{result.get('peak_gpu_gib', '-')} GiB.", "",
             "## Prefill p50 (ms)", "",
             "| configuration | eager | compiled | compiled + CUDA graph | build s | LM FLOPs ratio | kernels (eager) | TopK |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in result["prefill"].items():
        kernels = row.get("kernels") or {}
        lines.append(f"| {name} | {row.get('eager', '-')} | {row.get('compiled', '-')} | {row.get('graphed', '-')} | "
                     f"{row.get('build_s', '-')} | {row.get('lm_flops_ratio', '-')} | {kernels.get('count', '-')} | "
                     f"{kernels.get('topk', '-')} |")
    lines += ["", "## Eager prefill split (GPU ms by kernel kind; CPU: op counts)", "",
              "| configuration | split |", "|---|---|"]
    lines += [f"| {name} | {json.dumps(row['kernels'].get('gpu_ms') or row['kernels']['count_by_kind'])} |"
              for name, row in result["prefill"].items() if row.get("kernels")]
    lines += ["", "## Decode", "", "| configuration | tokens/s | ms/step |", "|---|---:|---:|"]
    lines += [f"| {name} | {row['tokens_per_s']} | {row['ms_per_step']} |" for name, row in result["decode"].items()]
    lines += ["", "## Builds", ""] + [f"- {name}: {json.dumps(row)}" for name, row in result["builds"].items()]
    if result["skipped"] or result.get("errors"):
        lines += ["", "## Skipped or failed", ""] + [f"- {s}" for s in result["skipped"]]
        lines += [f"- {k}: {v}" for k, v in result.get("errors", {}).items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = LLaVA-1.5-7B)")
    parser.add_argument("--small", action="store_true", help="narrow layers (CPU smoke runs; same tokens and layers)")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="the batched configuration's batch size")
    parser.add_argument("--methods", nargs="*", default=list(MAIN_METHODS))
    parser.add_argument("--batch-methods", nargs="*", default=["unpruned", "fitprune", "visionzip"],
                        help="configurations also timed at --batch")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip configurations once this much time is spent")
    parser.add_argument("--no-compile", action="store_true", help="eager engines only (quick CPU smoke runs)")
    parser.add_argument("--no-full-build", action="store_true", help="skip building a full default-bucket set")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU is visible to this PyTorch; pass --device cpu for a smoke run.")
    bench = Bench(args)
    run(bench)
    bench.save()
    print(markdown(bench.result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
