"""LLaVA-NeXT prefill latency per visual-token count N: unpruned vs pruned, ONNX Runtime CPU, next to whole-LM FLOPs.

A NeXT image brings its own N (anyres: base view + tiles, unpadded, one image_newline per row), and a `ratio`
recipe scales its counts to that N in the graph (`counts_at`: int(count * N / nominal)). The question: at each
N, does the pruned prefill graph run as much faster as its whole-LM FLOPs count says?

Images (W x H as usually written; N from `anyres_layout` on the llava-v1.6 pinpoints): 336x336, 640x480,
1280x720; plus every `default_buckets` value of the 7B NeXT config (the N a bucketed static engine pads to).

Two models, each prefill graph exported once by `exporter.graphs.export_prefill` (onnxruntime target kernels,
opset 23, max_seq 4096, N a dynamic dim) and timed at every N:

(a) `tiny-next` (embedded; d 64, 8 layers): unpruned (`unpruned_recipe`), FitPrune 40 % and 60 % calibrated with
    `calibrate.calibrate` (8 samples, CPU, ratio policy) and FastV 60 % (`method="fastv"`, from the budget).
(b) `wide7b-L<k>`: a LlavaNextForConditionalGeneration built from `llava_v1_6_vicuna_7b_config()` with the
    language model cut to --wide-layers layers (hidden 4096, MLP 11008, 32 heads, vocab 32064) and a 2-layer
    vision tower (never run: prefill takes inputs_embeds), weights seeded as bench/wide_7b_cpu.py does
    (`seeded_weight_noise`, noise / sqrt(fan_in)), never saved. Recipes: the shipped FitPrune NeXT recipes
    (recipes/llava-v1.6-vicuna-7b/fitprune-{40,60}.json, ratio, nominal 2880): their first k counts, all scaled
    by one factor s (bisection), so that the visual-only FLOPs reduction of the k-layer model at the nominal
    N = 2880 is the recipe's target (0.4 / 0.6), counts rounded down. Early-layer shape of FitPrune's schedule,
    the budget of the full model.

Timing: ONNX Runtime CPUExecutionProvider, `session.intra_op.allow_spinning = 0` (as our engines set it; with
spinning on, the session that ran before slows the next one, see prefill_latency.py), default threads. Input per
N: inputs_embeds [1, P + N + T, D] standard normal float32 (numpy seed 0), P = image_start of tiny-next's chat
template (used for the wide model too: it has no tokenizer), T = --text (20), image_starts [P], pad_lengths [0],
visual_mask ones [1, N]. Per model: --warmup untimed runs of every (graph, N), then --rounds rounds, each
visiting every (graph, N) once, the start rotating by one each round; medians. Latency ratio = median pruned /
median unpruned at the same N. FLOPs ratio = 1 - lm_flops_reduction(shape with num_visual_tokens = N, counts_at(N),
text_tokens = P + T, removed_before_llm).

    PYTHONPATH=$PWD .venv/bin/python bench/next_prefill.py                  # ~15 min on 2 cores
    .venv/bin/python bench/next_prefill.py --wide-layers 1 --rounds 2 --warmup 1 --out /tmp/np   # smoke
Results: bench/results/next_prefill.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS_DIR = REPO / "bench" / "results"
IMAGES = {"336x336": (336, 336), "640x480": (480, 640), "1280x720": (720, 1280)}  # name W x H: (H, W)
SHIPPED = {0.4: REPO / "recipes/llava-v1.6-vicuna-7b/fitprune-40.json",
           0.6: REPO / "recipes/llava-v1.6-vicuna-7b/fitprune-60.json"}
WIDE_SEED = 7


def image_counts(config) -> dict[str, int]:
    """N per bench image on this config's pinpoints, tile and patch size."""
    from visprune.models.anyres import layout_for_config

    return {name: layout_for_config(size, config).num_visual for name, size in IMAGES.items()}


def n_points(config) -> list[dict]:
    """The N values timed: each image's, and each default bucket (merged where equal)."""
    from visprune.models.anyres import default_buckets

    points: dict[int, list[str]] = {}
    for name, n in image_counts(config).items():
        points.setdefault(n, []).append(name)
    for bucket in default_buckets(config):
        points.setdefault(bucket, []).append(f"bucket {bucket}")
    return [{"n": n, "labels": labels} for n, labels in sorted(points.items())]


# --- recipes -------------------------------------------------------------------------------------------------

def tiny_next_recipes(shape, work: Path, samples: int) -> tuple[dict, dict]:
    """name -> Recipe for tiny-next, and each calibration's wall time (recipes reused from `work` if there)."""
    from calibrate import CalibrationConfig, calibrate, load_recipe
    from calibrate.recipe import unpruned_recipe

    recipes, walls = {"unpruned": unpruned_recipe(shape)}, {}
    for name, method, reduction in (("fitprune-40", "fitprune", 0.4), ("fitprune-60", "fitprune", 0.6),
                                    ("fastv-60", "fastv", 0.6)):
        path = work / f"tiny-next-{name}.json"
        if not path.exists():
            start = time.perf_counter()
            calibrate(CalibrationConfig(model="tiny-next", method=method, reduction=reduction, device="cpu",
                                        samples=samples), path, plot=False, progress=False)
            walls[name] = round(time.perf_counter() - start, 1)
            print(f"  calibrated tiny-next {name} in {walls[name]} s", flush=True)
        recipes[name] = load_recipe(path)
    return recipes, walls


def truncated_shipped_recipe(shipped, shape, layers: int):
    """The shipped recipe's first `layers` counts times one factor s, chosen so that the visual-only FLOPs
    reduction of a `layers`-layer model at the recipe's nominal N meets the recipe's target."""
    from calibrate.flops import visual_flops_reduction

    nominal = dataclasses.replace(shape, num_visual_tokens=shipped.num_visual_tokens)
    head = shipped.removed[:layers]

    def counts(s: float) -> list[int]:
        return [int(c * s) for c in head]

    def reduction(s: float) -> float:
        return visual_flops_reduction(nominal, counts(s))

    low, high = 0.0, (shipped.num_visual_tokens - 1) / sum(head)
    if reduction(high) < shipped.reduction_target:
        raise SystemExit(f"{layers} layers cannot reach {shipped.reduction_target} with this schedule")
    for _ in range(60):  # smallest s that meets the target
        mid = (low + high) / 2
        low, high = (low, mid) if reduction(mid) >= shipped.reduction_target else (mid, high)
    removed = counts(high)
    recipe = dataclasses.replace(shipped, removed=removed, model={"name": f"llava-v1.6-vicuna-7b widths, {layers} layers"},
                                 achieved={"visual_flops_reduction_at_nominal": round(reduction(high), 6)},
                                 search={"from": str(SHIPPED[shipped.reduction_target].relative_to(REPO)),
                                         "first_layers": layers, "scale": round(high, 6)})
    return recipe


def wide_recipes(shape) -> dict:
    from calibrate import load_recipe
    from calibrate.recipe import unpruned_recipe

    recipes = {"unpruned": unpruned_recipe(shape)}
    for target, path in SHIPPED.items():
        recipes[f"fitprune-{int(target * 100)}"] = truncated_shipped_recipe(load_recipe(path), shape, shape.num_layers)
    return recipes


# --- models --------------------------------------------------------------------------------------------------

def wide_next_config(layers: int):
    from visprune.models.llava import llava_v1_6_vicuna_7b_config

    config = llava_v1_6_vicuna_7b_config()
    config.text_config.num_hidden_layers = layers
    config.vision_config.num_hidden_layers = 2  # never run by the prefill graph; kept small to save memory
    return config


def build_wide_next(config):
    """LLaVA-NeXT-7B widths, seeded fan-in scaled noise (bench/wide_7b_cpu.py's rule); only exported, never saved."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    from visprune.models.tiny import seeded_weight_noise

    start = time.perf_counter()
    with torch.device("cpu"):
        model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        for _, param, noise, fan_in in seeded_weight_noise(model, WIDE_SEED):
            param.copy_(noise / math.sqrt(fan_in))
    print(f"  built the 7B-width model in {time.perf_counter() - start:.1f} s", flush=True)
    return model


def export_all(make_model, recipes: dict, image_start: int, work: Path, prefix: str) -> dict[str, dict]:
    """Each recipe's prefill graph (kept from an earlier run with the same --work if there)."""
    from exporter.graphs import KERNELS, export_prefill

    out, model = {}, None
    for name, recipe in recipes.items():
        path = work / prefix / name / "prefill.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if not path.exists():
            model = model or make_model()
            export_prefill(model, recipe, image_start, 4096, path, 23, KERNELS["onnxruntime"])
        out[name] = {"path": path, "export_s": round(time.perf_counter() - start, 1)}
        print(f"  exported {prefix}/{name} in {out[name]['export_s']} s", flush=True)
    return out


# --- timing --------------------------------------------------------------------------------------------------

def feeds_for(n: int, image_start: int, text: int, hidden: int) -> dict:
    from runtime.runner_api import RowLayout, prefill_feeds

    x = np.random.default_rng(0).standard_normal((1, image_start + n + text, hidden), dtype=np.float32)
    layout = dataclasses.replace(RowLayout.unpadded(1, image_start), visual_mask=np.ones((1, n), dtype=np.int64))
    return prefill_feeds(x, layout)


def time_graphs(paths: dict[str, Path], feeds: dict[int, dict], warmup: int, rounds: int) -> dict:
    """(graph, N) -> list of seconds; every pair once per round, the start rotating; also the kept counts the
    graph reports (its last output) at each N."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.use_env_allocators", "1")
    _register_shared_arena(ort)
    sessions = {g: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for g, p in paths.items()}
    pairs = [(g, n) for g in paths for n in feeds]
    kept = {}
    for g, n in pairs:
        for _ in range(warmup):
            outputs = sessions[g].run(None, feeds[n])
        kept[(g, n)] = _kept_after_last_cut(sessions[g], outputs)
    times = {pair: [] for pair in pairs}
    for r in range(rounds):
        shift = r % len(pairs)
        for g, n in pairs[shift:] + pairs[:shift]:
            start = time.perf_counter()
            sessions[g].run(None, feeds[n])
            times[(g, n)].append(time.perf_counter() - start)
        print(f"  round {r + 1}/{rounds} done, load {os.getloadavg()[0]:.2f}", flush=True)
    return {"times": times, "kept": kept}


_ARENA = []


def _register_shared_arena(ort) -> None:
    """One CPU arena shared by every session (extended by what is asked, not doubled). One arena per session
    reached 22 GB (OOM) with three 7B-width sessions, whose pruning layers hold [1, 32, S, S] float32 logits;
    no arena at all gives every run fresh pages to fault in, which charges those large tensors twice."""
    if not _ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))  # max_mem, kSameAsRequested
        _ARENA.append(info)


def _kept_after_last_cut(session, outputs) -> int | None:
    """Visual tokens in the last layer's KV cache minus the text: what the graph actually kept (None if unknown)."""
    names = [o.name for o in session.get_outputs()]
    keys = [o for name, o in zip(names, outputs) if name.startswith("present.") and name.endswith(".key")]
    return int(keys[-1].shape[2]) if keys else None


# --- one model -----------------------------------------------------------------------------------------------

def bench_model(label: str, make_model, shape, recipes: dict, image_start: int, args, work: Path, points) -> dict:
    """Export (the torch model is built by `make_model` and dropped before timing), time, tabulate."""
    from calibrate.flops import lm_flops_reduction
    from calibrate.recipe import counts_at

    exports = export_all(make_model, recipes, image_start, work, label)
    feeds = {p["n"]: feeds_for(p["n"], image_start, args.text, shape.hidden_size) for p in points
             if not (label.startswith("wide") and p["n"] in args.wide_skip_n)}
    load = [round(x, 2) for x in os.getloadavg()]
    print(f"timing {label}: {len(recipes)} graphs x {len(feeds)} N, load {load}", flush=True)
    measured = time_graphs({g: e["path"] for g, e in exports.items()}, feeds, args.warmup, args.rounds)
    rows = []
    for point in points:
        n = point["n"]
        if n not in feeds:
            continue
        shape_n = dataclasses.replace(shape, num_visual_tokens=n)
        base = float(np.median(measured["times"][("unpruned", n)]))
        for name, recipe in recipes.items():
            before, removed = counts_at(recipe, n)
            median = float(np.median(measured["times"][(name, n)]))
            cache_tokens = measured["kept"][(name, n)]
            rows.append({
                "model": label, "image": ", ".join(point["labels"]), "n": n, "recipe": name,
                "removed_at_n": removed, "removed_before_llm_at_n": before,
                "kept_after_last_cut": n - before - sum(removed),
                "last_layer_cache_tokens": cache_tokens,
                "median_ms": median * 1000, "min_ms": float(np.min(measured["times"][(name, n)])) * 1000,
                "samples_ms": [t * 1000 for t in measured["times"][(name, n)]],
                "latency_ratio": median / base,
                "lm_flops_ratio": 1.0 - lm_flops_reduction(shape_n, removed, image_start + args.text, before),
            })
    return {"label": label, "lm_shape": dataclasses.asdict(shape), "image_start": image_start,
            "recipes": {name: r.to_dict() for name, r in recipes.items()},
            "export_s": {name: e["export_s"] for name, e in exports.items()},
            "load_before_timing": load, "rows": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wide-layers", type=int, default=1, help="decoder layers of the 7B-width model")
    parser.add_argument("--wide-skip-n", type=int, nargs="*", default=[2352],
                        help="N values not timed on the wide model (2352: 12 tokens above 640x480's 2340)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--text", type=int, default=20, help="T: text tokens after the image")
    parser.add_argument("--samples", type=int, default=8, help="tiny-next calibration samples")
    parser.add_argument("--work", type=Path, default=None, help="recipes and graphs (reused when present)")
    parser.add_argument("--skip", choices=["tiny", "wide"], default=None)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    from exporter.export import template_image_start
    from visprune.models import load_llava
    from visprune.models.llava import LanguageModelShape, llava_v1_6_vicuna_7b_config

    work = args.work or Path(tempfile.mkdtemp(prefix="next-prefill-"))
    work.mkdir(parents=True, exist_ok=True)
    t0, load_start = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    config_7b = llava_v1_6_vicuna_7b_config()
    points = n_points(config_7b)
    bundle = load_llava("tiny-next")
    image_start = template_image_start(bundle)
    results = {"images": {name: {"h_w": list(size), "n": n} for (name, size), n in
                          zip(IMAGES.items(), image_counts(config_7b).values())},
               "tiny_next_images": image_counts(bundle.config), "points": points, "models": [], "calibration_s": {}}
    if args.skip != "tiny":
        shape = LanguageModelShape.from_config(bundle.config)
        recipes, results["calibration_s"] = tiny_next_recipes(shape, work, args.samples)
        model = bundle.model
        results["models"].append(bench_model("tiny-next", lambda: model, shape, recipes, image_start, args, work, points))
        del model
    del bundle
    if args.skip != "wide":
        config = wide_next_config(args.wide_layers)
        shape = LanguageModelShape.from_config(config)
        label = f"wide7b-L{args.wide_layers}"
        results["models"].append(bench_model(label, lambda: build_wide_next(config), shape, wide_recipes(shape),
                                             image_start, args, work, points))
    results["run"] = {"wall_s": round(time.perf_counter() - t0, 1), "warmup": args.warmup, "rounds": args.rounds,
                      "text_after_image": args.text, "load_start": load_start,
                      "wide_skip_n": args.wide_skip_n, "ort_memory": "one shared CPU arena (kSameAsRequested), spinning off",
                      "load_end": [round(x, 2) for x in os.getloadavg()], "argv": sys.argv[1:]}
    results["host"] = host_info()
    write_results(results, args.out)


def host_info() -> dict:
    from visprune.artifacts import tool_versions

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "tools": tool_versions("torch", "transformers", "onnx", "onnxruntime")}


def write_results(results: dict, out: Path) -> None:
    from visprune.artifacts import atomic_write_bytes, atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "next_prefill.json", results)
    atomic_write_bytes(out / "next_prefill.md", markdown(results).encode())
    print((out / "next_prefill.md").read_text())


def markdown(results: dict) -> str:
    run, host = results["run"], results["host"]
    images = ", ".join(f"{name} → N = {v['n']}" for name, v in results["images"].items())
    lines = ["# LLaVA-NeXT prefill latency per N: unpruned vs pruned (ONNX Runtime, CPU)", "",
             f"Images (W x H, llava-v1.6 pinpoints, `anyres_layout`): {images}; default buckets "
             f"{[p['n'] for p in results['points'] if any(l.startswith('bucket') for l in p['labels'])]}.",
             f"Input [1, P + N + T, D], T = {run['text_after_image']}; {run['warmup']} warm-up runs, "
             f"{run['rounds']} rotated rounds, medians; ORT CPU, spinning off, one shared arena.", ""]
    for m in results["models"]:
        s = m["lm_shape"]
        lines += [f"## {m['label']}: {s['num_layers']} layers, d {s['hidden_size']}, MLP {s['intermediate_size']}, "
                  f"{s['num_heads']} heads; P = {m['image_start']}; load before timing {m['load_before_timing']}", ""]
        for name, r in m["recipes"].items():
            lines.append(f"- `{name}`: {r['method']}, {r.get('budget_policy', 'fixed')}, nominal N "
                         f"{r['num_visual_tokens']}, removed {r['removed']}")
        lines += ["", "| model | image | N | method/budget | kept after last cut | median ms | latency ratio "
                  "| whole-LM FLOPs ratio | latency / FLOPs |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
        for r in m["rows"]:
            lines.append(f"| {r['model']} | {r['image']} | {r['n']} | {r['recipe']} | {r['kept_after_last_cut']} | "
                         f"{r['median_ms']:.1f} | {r['latency_ratio']:.3f} | {r['lm_flops_ratio']:.3f} | "
                         f"{r['latency_ratio'] / r['lm_flops_ratio']:.3f} |")
        lines.append("")
    lines += [f"Host: {host['cpu_count']} CPUs, {host['cpu_model']}; load at start {run['load_start']}, at end "
              f"{run['load_end']}; wall {run['wall_s']} s; tools {host['tools']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
