"""Our engines against the PyTorch model a user already has: TTFT, prefill, decode, memory, latency / FLOPs.

The question (issue 13): is an engine at least as fast as Hugging Face transformers with `sdpa` attention, and
does pruning buy its FLOPs ratio? One run, on the bench checkpoint of `prefill_latency.py` (tiny's vision tower
and processor, a d = 1024, 8-layer, 16-head Llama decoder):

1.  Calibrates FitPrune recipes at `--reductions` (default 0.4 / 0.6 / 0.8; 8 samples, seed 0; cached in --work).
2.  Exports the ONNX set of each recipe and of the unpruned model (`export_onnx`, `--target` flavour) and builds
    an ONNX Runtime engine and a PyTorch engine from each (`build_engine`, CPU).
3.  Times every engine **in its own process** (this script re-invoked with --measure): one request, scikit-image's
    `chelsea` photograph and one question, greedy, `--new-tokens` tokens; `--warmup` untimed requests then
    `--runs` timed ones (reports/latency.py's `time_request`: TTFT = vision + embed + prefill + first token).
    The peer, transformers' `LlavaForConditionalGeneration` with `attn_implementation="sdpa"` (and `eager`), is
    timed the same way in its own process: TTFT = one forward over pixels + prompt to the first token, then one
    forward per new token with its DynamicCache. Peak memory: the process's VmHWM (resident high-water mark).
4.  Profiles the ONNX Runtime prefill graphs (ORT profiler) by category: linear layers, attention, FitPrune
    scoring + TopK + row gathers, other (norms, RoPE, SiLU, reshapes).

Results: bench/results/engine_speed[-LABEL].{json,md}.

    VISPRUNE_CACHE=/tmp/vpcache .venv/bin/python bench/engine_speed.py --work /tmp/es      # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUESTION = "What animal is in the picture, and what colour is it?"


# --- measuring one engine or the peer, in this process -------------------------------------------------------

def measure_engine(engine_dir: Path, warmup: int, runs: int, new_tokens: int) -> dict[str, Any]:
    from reports.latency import _request, summarize_requests, time_request
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_engine_dir(engine_dir)
    request = _request(pipe, None, QUESTION, new_tokens)
    for _ in range(warmup):
        time_request(pipe, request)
    timed = [time_request(pipe, request) for _ in range(runs)]
    return {"prompt_tokens": int(request.input_ids.shape[1]), **summarize_requests(timed),
            "session": getattr(pipe.runner, "session_facts", None), "peak_rss_bytes": _peak_rss()}


def measure_transformers(model_path: Path, attention: str, warmup: int, runs: int, new_tokens: int) -> dict:
    import torch
    from transformers import LlavaForConditionalGeneration

    from reports.latency import LatencyStats, default_latency_image
    from visprune.models import chat_prompt, load_llava
    from visprune.models.inputs import encode_image_prompt

    bundle = load_llava(str(model_path))
    model = LlavaForConditionalGeneration.from_pretrained(model_path, attn_implementation=attention).eval()
    encoded = encode_image_prompt(bundle.processor, default_latency_image(), chat_prompt(bundle.processor, QUESTION),
                                  bundle.image_token_id)
    del bundle

    @torch.no_grad()
    def request() -> dict[str, Any]:
        start = time.perf_counter()
        out = model(input_ids=encoded.input_ids, pixel_values=encoded.pixel_values, use_cache=True,
                    logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ttft, steps, past = time.perf_counter() - start, [], out.past_key_values
        for _ in range(new_tokens - 1):
            begin = time.perf_counter()
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            token, past = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
            steps.append(time.perf_counter() - begin)
        return {"ttft_s": ttft, "decode_step_s": steps}

    for _ in range(warmup):
        request()
    timed = [request() for _ in range(runs)]
    steps = [s for r in timed for s in r["decode_step_s"]]
    return {"prompt_tokens": int(encoded.input_ids.shape[1]), "attention": attention,
            "ttft": LatencyStats.from_seconds([r["ttft_s"] for r in timed]).__dict__,
            "decode_per_token": LatencyStats.from_seconds(steps).__dict__ if steps else None,
            "torch_threads": torch.get_num_threads(), "peak_rss_bytes": _peak_rss()}


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measure_in_subprocess(args: list[str]) -> dict[str, Any]:
    """This script with --measure ...: a fresh process, so no engine shares threads, caches or allocator."""
    result = subprocess.run([sys.executable, __file__, "--measure", *args], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"measuring {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- building ------------------------------------------------------------------------------------------------

def export_and_build(model_path: Path, recipes: dict[str, Any], work: Path, target: str | None,
                     reuse: bool) -> dict[str, dict[str, Any]]:
    """ONNX set + engines per recipe: ONNX Runtime and PyTorch for FitPrune and unpruned, ONNX Runtime only for
    the random-selection twins (FitPrune's counts, no probabilities read)."""
    from calibrate.recipe import save_recipe
    from engines import BuildConfig, build_engine
    from exporter import ExportConfig, export_onnx

    out = {}
    for name, recipe in recipes.items():
        onnx_dir, recipe_path = work / f"onnx-{name}", work / f"recipe-{name}.json" if recipe else None
        if recipe is not None:
            save_recipe(recipe, recipe_path)
        flavour = {"target": target} if target else {}
        export_s = None
        if not (reuse and onnx_dir.exists()):
            start = time.perf_counter()
            export_onnx(ExportConfig(model=str(model_path), recipe=recipe_path, **flavour), onnx_dir, progress=False,
                        force=True)
            export_s = time.perf_counter() - start
            print(f"exported {name} in {export_s:.1f} s", flush=True)
        engines = {}
        for backend in ("onnxruntime",) if name.startswith("random") else ("onnxruntime", "pytorch"):
            engine_dir = work / f"{backend}-{name}"
            if not (reuse and engine_dir.exists()):
                build_engine(BuildConfig(backend=backend), onnx_dir, engine_dir, force=True)
            engines[backend] = engine_dir
        out[name] = {"onnx": onnx_dir, "engines": engines, "export_s": export_s, "recipe": recipe}
    return out


# --- profile -------------------------------------------------------------------------------------------------

PROFILE_CATEGORIES = ("linear", "attention", "scoring + TopK + gathers", "other")


def profile_prefill(onnx_dir: Path, seq: int, runs: int, work: Path) -> dict[str, Any]:
    """Node kernel time per category of one prefill graph (ORT profiler, sequential executor)."""
    import onnxruntime as ort
    import prefill_latency as pl

    path = onnx_dir / "prefill.onnx"
    info = pl.node_info(path)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(work / f"profile-{onnx_dir.name}")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    hidden = session.get_inputs()[0].shape[2]
    feeds = pl.feeds_of(np.random.default_rng(0).standard_normal((1, seq, hidden), dtype=np.float32))
    for _ in range(2 + runs):
        session.run(None, feeds)
    trace = json.loads(Path(session.end_profiling()).read_text())
    first = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"][-runs]["ts"]
    totals = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < first:
            continue
        node = e["name"][: -len("_kernel_time")]
        meta = info.get(node) or info.get(node.split("/")[0]) or {"trace": ""}
        shapes = [list(d.values())[0] for d in e.get("args", {}).get("output_type_shape", [])]
        totals[_category(e["args"].get("op_name", "?"), meta["trace"], len(shapes[0]) if shapes else 0)] += \
            e["dur"] / 1000.0 / runs
    return {k: round(v, 2) for k, v in totals.items()}


def _category(op: str, trace: str, out_rank: int) -> str:
    if "surviving_rows" in trace or "_take_rows" in trace or "selection.py" in trace or op == "TopK":
        return PROFILE_CATEGORIES[2]
    if op in ("Attention", "MultiHeadAttention", "GroupQueryAttention", "Softmax", "Trilu"):
        return PROFILE_CATEGORIES[1]
    if op in ("MatMul", "FusedMatMul", "Gemm"):
        return PROFILE_CATEGORIES[1] if out_rank == 4 else PROFILE_CATEGORIES[0]
    return PROFILE_CATEGORIES[3]


# --- report --------------------------------------------------------------------------------------------------

def markdown(result: dict[str, Any]) -> str:
    peer = result["peer"]["sdpa"]["ttft"]["p50_ms"]
    lines = [f"# Engine speed: our engines vs transformers ({result['label']})", "",
             f"Bench model: d = 1024, 8-layer, 16-head Llama decoder with tiny's vision tower (576 visual tokens). "
             f"One request: {result['prompt_tokens']} prompt tokens (chelsea + one question), "
             f"{result['new_tokens']} new tokens; each engine in its own process, {result['warmup']} warm-up + "
             f"{result['runs']} timed requests; medians. Export flavour: `{result['target']}`.",
             f"Machine: {result['machine']['cpus']} CPUs ({result['machine']['cpu']}), "
             f"{result['machine']['versions']}.", "",
             "| engine | method | reduction | LM FLOPs ratio | TTFT ms | prefill ms | decode ms/token | prefill / FLOPs ratio "
             "| TTFT speed-up vs transformers sdpa | peak RSS MiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for attention, row in result["peer"].items():
        lines.append(f"| transformers `{attention}` | none | 0 | 1.000 | {row['ttft']['p50_ms']:.1f} | | "
                     f"{row['decode_per_token']['p50_ms']:.1f} | | {peer / row['ttft']['p50_ms']:.2f}x | "
                     f"{row['peak_rss_bytes'] / 2**20:.0f} |")
    for row in result["engines"]:
        m = row["measured"]
        lines.append(f"| {row['backend']} | {row.get('method', 'fitprune')} | {row['reduction']} | {row['flops_ratio']:.3f} | {m['ttft']['p50_ms']:.1f} | "
                     f"{m['prefill']['p50_ms']:.1f} | {m['decode_per_token']['p50_ms']:.1f} | "
                     f"{row['prefill_ratio_over_flops']:.3f} | {peer / m['ttft']['p50_ms']:.2f}x | "
                     f"{m['peak_rss_bytes'] / 2**20:.0f} |")
    lines += ["", "ORT prefill profile, node kernel time per run (ms):", "",
              "| graph | " + " | ".join(PROFILE_CATEGORIES) + " | total |", "|---|" + "---:|" * 5]
    for name, cats in result["profile"].items():
        lines.append(f"| {name} | " + " | ".join(f"{cats[c]:.1f}" for c in PROFILE_CATEGORIES)
                     + f" | {sum(cats.values()):.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], out: Path) -> None:
    """TTFT per engine and reduction, one panel per result (e.g. before / after), transformers as a line."""
    from visprune.figures import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), sharey=True, squeeze=False)
    for ax, result in zip(axes[0], results):
        for backend, method, marker, color in (("onnxruntime", "fitprune", "o-", "C0"),
                                               ("onnxruntime", "random", "s--", "C1"), ("pytorch", "fitprune", "^-", "C2")):
            rows = [r for r in result["engines"] if r["backend"] == backend
                    and r.get("method", "fitprune") in (method, "none")]
            if rows:
                ax.plot([float(r["reduction"]) for r in rows], [r["measured"]["ttft"]["p50_ms"] for r in rows],
                        marker, color=color, label=f"{backend} {method}")
        for attention, style in (("sdpa", "k-"), ("eager", "k:")):
            ax.axhline(result["peer"][attention]["ttft"]["p50_ms"], color="k", linestyle=style[1:],
                       label=f"transformers {attention} (unpruned)")
        ax.set(title=f"{result['label']} (export target: {result['target']})", xlabel="visual FLOPs reduction",
               ylabel="TTFT ms (median)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, out)


# --- main ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)  # internal: one engine / the peer
    parser.add_argument("--reductions", type=float, nargs="+", default=[0.4, 0.6, 0.8])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--target", default=None, help="export flavour (default: the exporter's default)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--profile-runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/engine-speed"), help="recipes, ONNX sets, engines")
    parser.add_argument("--reuse", action="store_true", help="reuse recipes, ONNX sets and engines in --work")
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--plot", type=Path, nargs="+", help="only plot these result JSONs side by side (to --out)")
    args = parser.parse_args(argv)
    if args.plot:
        plot([json.loads(p.read_text()) for p in args.plot], args.out / "engine_speed.png")
        return 0
    if args.measure:
        kind, where, *rest = args.measure
        timing = (args.warmup, args.runs, args.new_tokens)
        result = (measure_engine(Path(where), *timing) if kind == "engine"
                  else measure_transformers(Path(where), rest[0], *timing))
        print(json.dumps(result))
        return 0
    return run_benchmark(args)


def run_benchmark(args) -> int:
    import prefill_latency as pl

    from calibrate.flops import lm_flops_reduction
    from visprune.artifacts import tool_versions
    from visprune.models import load_llava

    args.work.mkdir(parents=True, exist_ok=True)
    model_path, _ = pl.ensure_bench_model()
    calibrations = pl.calibrate_recipes(model_path, args.reductions, args.samples, args.work, reuse=True)
    from calibrate.baselines import random_recipe

    recipes = {"unpruned": None, **{f"r{r}": c["recipe"] for r, c in calibrations.items()},
               **{f"random-r{r}": random_recipe(c["recipe"], seed=0) for r, c in calibrations.items()}}
    built = export_and_build(model_path, recipes, args.work, args.target, args.reuse)
    timing = ["--warmup", str(args.warmup), "--runs", str(args.runs), "--new-tokens", str(args.new_tokens)]
    peer = {}
    for attention in ("sdpa", "eager"):
        print(f"timing transformers {attention} ...", flush=True)
        peer[attention] = measure_in_subprocess(["peer", str(model_path), attention, *timing])
    shape = load_llava(str(model_path)).shape
    prompt_tokens = peer["sdpa"]["prompt_tokens"]
    text_tokens = prompt_tokens - shape.num_visual_tokens
    rows, base = [], {}
    for backend in ("onnxruntime", "pytorch"):
        for name, item in ((n, i) for n, i in built.items() if backend in i["engines"]):
            print(f"timing {backend} {name} ...", flush=True)
            measured = measure_in_subprocess(["engine", str(item["engines"][backend]), *timing])
            base.setdefault(backend, measured["prefill"]["p50_ms"])
            removed = item["recipe"].removed if item["recipe"] else [0] * shape.num_layers
            flops_ratio = 1.0 - lm_flops_reduction(shape, removed, text_tokens)
            rows.append({"backend": backend, "graph": name, "method": item["recipe"].method if item["recipe"] else "none",
                         "reduction": name.split("r")[-1] if item["recipe"] else 0,
                         "removed": removed, "flops_ratio": flops_ratio, "export_s": item["export_s"],
                         "prefill_ratio_over_flops": measured["prefill"]["p50_ms"] / base[backend] / flops_ratio,
                         "measured": measured})
    profile = {name: profile_prefill(item["onnx"], prompt_tokens, args.profile_runs, args.work)
               for name, item in built.items()} if args.profile_runs else {}
    result = {"label": args.label, "target": args.target or "default", "prompt_tokens": prompt_tokens,
              "new_tokens": args.new_tokens, "warmup": args.warmup, "runs": args.runs, "peer": peer,
              "engines": rows, "profile": profile,
              "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                          "versions": tool_versions("torch", "transformers", "onnxruntime", "onnx")},
              "loadavg_after": os.getloadavg()}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"engine_speed-{args.label}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    stem.with_suffix(".md").write_text(markdown(result))
    plot([result], stem.with_suffix(".png"))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
