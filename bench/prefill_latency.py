"""Prefill latency of the pruned vs the unpruned ONNX prefill graph, next to the whole-LM FLOPs ratio.

The question: does a pruned prefill graph run as much faster as its FLOPs count says, i.e. do the in-graph
FitPrune scoring (head-max of the attention probabilities, a_self * a_cross, two TopK) and the row Gathers cost
little? Goal checked (and reported whatever it is):

    latency ratio (median pruned / median unpruned)  <=  1.05 x  FLOPs ratio (pruned / unpruned whole-LM FLOPs)

What one run does, on CPU:

1.  Builds (once, into $VISPRUNE_CACHE/bench-models/llava-h1024-v1) a bench checkpoint where matrix products
    dominate: the embedded `tiny` model's processor, tokenizer and vision tower (576 visual tokens), with a
    Llama decoder of hidden size 1024, MLP 2816, 16 heads (16 KV heads), 8 layers, seeded like `tiny`
    (`_seeded_init_`), written with `save_pretrained`, and loaded back through `load_llava(path)`.
2.  Calibrates real FitPrune recipes for it (`calibrate.calibrate`, library call) at visual-FLOPs reductions
    0.4 / 0.6 / 0.8 on a seeded subset of the embedded calibration set (default 8 samples, seed 0, CPU), timed.
3.  Exports only the prefill graph (`exporter.graphs.export_prefill`, the onnxruntime target's opset 23 and
    kernels, max_seq 2048, image_start from the chat template) for each recipe and for the unpruned recipe (`unpruned_recipe`, same export code), timed.
    Also, per recipe, a *fixed-count twin*: the same per-layer token counts, but the dropped tokens are the last
    visual ones, cut with Slices + Concat (no head-max scoring, no TopK, no Gather). pruned / twin isolates the
    cost of FitPrune's in-graph selection from the effect of the token counts themselves.
4.  Times ONNX Runtime (CPUExecutionProvider, default session options and thread settings) on one input:
    inputs_embeds [1, P + N + T, D], P = image_start = 4, N = 576, T = the calibration subset's mean text length
    after the image (rounded), standard normal float32 from a fixed seed. After waiting for the 1-minute load
    average to settle (the calibration and export steps above load the machine themselves), every session gets
    `--warmup` untimed runs, then `--runs` timed rounds; in each round every graph is visited once (round-robin,
    the starting graph rotating each round so that drift and "which graph ran before" affect all equally). Each
    run is a full `session.run` (all outputs: logits, present K/V, kept indices), timed with time.perf_counter.
    A visit is three consecutive runs: the 2nd and 3rd are the headline (`steady`); the first (`after_switch`,
    i.e. plain round-robin) is reported too, because ORT's intra-op threads keep spinning after a run by default and the
    previous session's spinning thread slows the next session's first run by a roughly constant amount. A second
    round-robin with `session.intra_op.allow_spinning = 0` (`no_spinning`, one run per visit) checks that.
5.  FLOPs: `1 - lm_flops_reduction(shape, removed, text_tokens = P + T)` (every non-visual token; matmul
    multiply-adds of the decoder layers, LM head and embeddings left out) and the visual-only reduction the recipe
    was fitted to. latency ratio = median pruned / median unpruned; also the median of per-round paired ratios.
6.  KV-cache bytes per request: the sum of `present.{l}.key/value` nbytes of an actual run's outputs.
7.  Times one `exporter.export_onnx` of the full `tiny` ONNX set (vision + prefill + decode + lint) with the
    tiny model's reference recipe [143, 101, 44, 41, 18, 28, 0, 0].
8.  Profiles every graph (ORT `enable_profiling`, fresh sessions, a few runs) and sums node kernel time per
    category: linear layers, attention core, FitPrune scoring + TopK (nodes whose dynamo stack trace is
    `surviving_rows`), row gathers (`_take_rows`), the rest; and counts matmul multiply-adds from the profiled
    shapes (a check of the FLOPs model) and linear-layer GFLOP/s by the number of token rows.

Results: bench/results/prefill_latency.{json,md}.

    VISPRUNE_CACHE=/tmp/vpcache .venv/bin/python bench/prefill_latency.py
    # quick development run (tiny settings, results elsewhere, recipes and graphs kept and reused):
    .venv/bin/python bench/prefill_latency.py --samples 2 --runs 3 --warmup 1 --profile-runs 1 --no-spin-check
        --no-tiny-export --max-wait 0 --work /tmp/pl --reuse --out /tmp/pl/out
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BENCH_MODEL_VERSION = 1
BENCH_TEXT_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                        num_key_value_heads=16)
TINY_REFERENCE_RECIPE = [143, 101, 44, 41, 18, 28, 0, 0]  # bench/results/calibration_speed.md, tiny, 0.6
GOAL = 1.05


# --- 1. the bench checkpoint ---------------------------------------------------------------------------------

def bench_model_path() -> Path:
    from visprune.models.cache import cache_root

    return cache_root() / "bench-models" / f"llava-h{BENCH_TEXT_SHAPE['hidden_size']}-v{BENCH_MODEL_VERSION}"


def ensure_bench_model() -> tuple[Path, float | None]:
    """The bench checkpoint's folder, built if missing; and the build time (None when it already existed)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from visprune.outputs import atomic_directory
    from visprune.models import tiny

    path = bench_model_path()
    if (path / "config.json").exists():
        return path, None
    start = time.perf_counter()
    with atomic_directory(path) as staging:
        processor = tiny._build_processor()
        with mock.patch.dict(tiny.TEXT_SHAPE, BENCH_TEXT_SHAPE):  # the tiny config with only the LM shape changed
            config = tiny._build_config(processor.tokenizer)
        with torch.device("cpu"):
            model = LlavaForConditionalGeneration(config)
        tiny._seeded_init_(model, tiny.TINY_SEED)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return path, time.perf_counter() - start


# --- 2./3. recipes and prefill graphs ------------------------------------------------------------------------

def calibrate_recipes(model_path: Path, reductions: list[float], samples: int, work: Path,
                      reuse: bool) -> dict[float, dict]:
    from calibrate import CalibrationConfig, calibrate, load_recipe

    out = {}
    for reduction in reductions:
        if reuse and (work / f"recipe-{reduction}.json").exists():
            out[reduction] = {"recipe": load_recipe(work / f"recipe-{reduction}.json"), "wall_s": None,
                              "timings": None}
            continue
        config = CalibrationConfig(model=str(model_path), reduction=reduction, samples=samples, seed=0, device="cpu")
        print(f"calibrating reduction {reduction} ({samples} samples) ...", flush=True)
        start = time.perf_counter()
        result = calibrate(config, work / f"recipe-{reduction}.json", plot=False, progress=False)
        wall = time.perf_counter() - start
        print(f"    {wall:.1f} s, removed {result.recipe.removed}", flush=True)
        out[reduction] = {"recipe": result.recipe, "wall_s": wall, "timings": result.timings}
    return out


def feeds_of(x):
    """The prefill graph's inputs for inputs_embeds x [1, S, D] (image at P = 4, as main() builds x)."""
    from runtime.runner_api import RowLayout, prefill_feeds

    return prefill_feeds(x, RowLayout.unpadded(len(x), 4))  # P = 4: the tiny chat template


def fixed_count_twin_class():
    """`PrunedLlamaPrefill` with the same per-layer token counts but no scoring: at a pruning layer it drops the
    *last* `removed` visual tokens by two Slices and a Concat instead of head-max scores, TopK and Gathers.
    pruned / twin latency is therefore the cost of FitPrune's in-graph selection (scoring, TopK, gathers)."""
    import torch

    from exporter.pruned_lm import PrunedLlamaPrefill
    from visprune.models.decoder import attend, finish_layer

    class FixedCountPrefill(PrunedLlamaPrefill):
        def forward(self, inputs_embeds: torch.Tensor, image_starts=None, pad_lengths=None):  # one unpadded layout
            batch, seq, _ = inputs_embeds.shape
            hidden, p, n = inputs_embeds, self.image_start, self.num_visual
            positions = torch.arange(seq, device=hidden.device).unsqueeze(0).expand(batch, seq)
            presents, kept = [], []
            for layer, removed in zip(self.layers, self.removed):
                context, _, key, value = attend(layer, self.rotary, hidden, positions, causal=True,
                                                kernels=self.kernels, probs=None)
                presents += [key, value]
                if removed:
                    keep = n - removed
                    hidden, context, positions = (torch.cat([t[:, :p + keep], t[:, p + n:]], dim=1)
                                                  for t in (hidden, context, positions))
                    kept.append(torch.arange(keep, device=hidden.device).unsqueeze(0).expand(batch, keep))
                    n = keep
                hidden = finish_layer(layer, hidden, context, self.kernels)
            return self.lm_head(self.norm(hidden[:, -1])), presents, kept

    return FixedCountPrefill


def export_prefills(bundle, recipes: dict[str, Any], image_start: int, work: Path, twins: bool,
                    reuse: bool) -> dict[str, dict]:
    from exporter import graphs

    jobs = [(name, recipe, False) for name, recipe in recipes.items()]
    if twins:
        jobs += [(f"{name}-fixed", recipe, True) for name, recipe in recipes.items() if any(recipe.removed)]
    out = {}
    for name, recipe, twin in jobs:
        path = work / f"prefill-{name}.onnx"
        if reuse and path.exists():
            out[name] = {"path": path, "export_s": None, "recipe": recipe, "twin": twin}
            continue
        print(f"exporting prefill {name} ...", flush=True)
        start = time.perf_counter()
        patch = mock.patch.object(graphs, "PrunedLlamaPrefill", fixed_count_twin_class()) if twin else _nothing()
        with patch:
            graphs.export_prefill(bundle.model, recipe, image_start=image_start, max_seq=2048, out=path, opset=23,
                                  kernels=graphs.KERNELS["onnxruntime"])
        wall = time.perf_counter() - start
        print(f"    {wall:.1f} s", flush=True)
        out[name] = {"path": path, "export_s": wall, "recipe": recipe, "twin": twin}
    return out


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def time_tiny_export(work: Path) -> float:
    from exporter import ExportConfig, export_onnx

    recipe_path = work / "tiny-recipe.json"
    recipe_path.write_text(json.dumps({"method": "fitprune", "num_visual_tokens": 576,
                                       "removed": TINY_REFERENCE_RECIPE}))
    print("exporting the full tiny ONNX set ...", flush=True)
    start = time.perf_counter()
    export_onnx(ExportConfig(model="tiny", recipe=recipe_path), work / "tiny-onnx", progress=False)
    wall = time.perf_counter() - start
    print(f"    {wall:.1f} s", flush=True)
    return wall


# --- 4. latency ----------------------------------------------------------------------------------------------

def wait_for_quiet(threshold: float, max_wait: float) -> dict[str, Any]:
    """Poll the 1-minute load average until it is below `threshold` (or `max_wait` seconds passed)."""
    start = time.perf_counter()
    load = os.getloadavg()
    announced = False
    while load[0] >= threshold and time.perf_counter() - start < max_wait:
        if not announced:
            print(f"waiting for the 1-min load average ({load[0]:.2f}) to fall below {threshold} "
                  f"(at most {max_wait:.0f} s) ...", flush=True)
            announced = True
        time.sleep(10)
        load = os.getloadavg()
    waited = time.perf_counter() - start
    quiet = load[0] < threshold
    if not quiet:
        print(f"warning: load average still {load[0]:.2f} after {waited:.0f} s; timing anyway", flush=True)
    return {"threshold": threshold, "waited_s": round(waited, 1), "reached": quiet,
            "loadavg_1_5_15": [round(x, 2) for x in load]}


MODES = {
    "steady": "default session options; each visit to a graph is 3 consecutive runs, the 2nd and 3rd are timed "
              "(headline)",
    "after_switch": "default session options; the 1st run of each visit, right after another session ran "
                    "(what a plain round-robin measures)",
    "no_spinning": "session.intra_op.allow_spinning = 0, otherwise default; plain round-robin, one run per visit",
}


def measure_latency(paths: dict[str, Path], x: np.ndarray, warmup: int, runs: int,
                    spinning: bool) -> dict[str, Any]:
    """Round-robin timing. With spinning (ORT's default), each visit to a graph is three consecutive runs: the
    first is timed as `after_switch`, the next two as `steady` (the previous session's intra-op threads keep
    spinning for a while after its run and compete for the two cores with the first run of the next session).
    Without spinning, one run per visit (`no_spinning`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in paths.items()}
    names = list(paths)
    feeds = feeds_of(x)
    outputs: dict[str, list] = {}
    for name in names:  # warm-up, one graph after the other
        for _ in range(warmup):
            outputs[name] = sessions[name].run(None, feeds)
    kv = {}
    for name, sess in sessions.items():
        out_names = [o.name for o in sess.get_outputs()]
        presents = [o for n, o in zip(out_names, outputs[name]) if n.startswith("present.")]
        kv[name] = {"bytes": int(sum(p.nbytes for p in presents)),
                    "tokens_per_layer": [int(p.shape[2]) for n, p in zip(out_names, outputs[name])
                                         if n.startswith("present.") and n.endswith(".key")]}
    del outputs
    visit = ["after_switch", "steady", "steady"] if spinning else ["no_spinning"]
    modes = list(dict.fromkeys(visit))
    times: dict[str, dict[str, list[float]]] = {m: {name: [] for name in names} for m in modes}
    rounds: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for r in range(runs):
        order = names[r % len(names):] + names[:r % len(names)]
        this_round: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in modes}
        for name in order:
            for mode in visit:
                start = time.perf_counter()
                sessions[name].run(None, feeds)
                this_round[mode][name].append(time.perf_counter() - start)
        for mode in modes:
            for name in names:
                times[mode][name] += this_round[mode][name]
            rounds[mode].append({name: float(np.mean(v)) for name, v in this_round[mode].items()})
        shown = rounds[modes[-1]][-1]
        print(f"  {modes[-1]} round {r + 1:2d}/{runs}: " + "  ".join(f"{n} {shown[n] * 1000:6.1f}" for n in names)
              + " ms", flush=True)
    return {"times": times, "rounds": rounds, "kv": kv}


def summarize(ts: list[float]) -> dict[str, float]:
    a = np.asarray(ts) * 1000.0
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)), "min_ms": float(a.min()),
            "max_ms": float(a.max()), "iqr_ms": float(np.percentile(a, 75) - np.percentile(a, 25)),
            "rel_spread_iqr_over_median": float((np.percentile(a, 75) - np.percentile(a, 25)) / np.median(a))}


# --- 8. profile ----------------------------------------------------------------------------------------------

CATEGORIES = ("linear layers (q/k/v/o, MLP, head)", "attention core (QK^T, mask, softmax, PV)",
              "FitPrune scoring + TopK", "row gathers", "other (norms, RoPE, SiLU, reshapes)")


def node_info(path: Path) -> dict[str, dict[str, Any]]:
    """Per ONNX node: op type, the PyTorch source line it came from (dynamo metadata) and its weight's shape."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    info = {}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        info[node.name] = {"op": node.op_type, "trace": meta.get("pkg.torch.onnx.stack_trace", ""),
                           "weight": next((weights[i] for i in node.input[1:2] if i in weights), None)}
    return info


def classify(op: str, trace: str, out_rank: int) -> str:
    if "surviving_rows" in trace or op in ("TopK", "ReduceMax"):
        return CATEGORIES[2]
    if "_take_rows" in trace:
        return CATEGORIES[3]
    if op in ("MatMul", "FusedMatMul", "Gemm"):
        return CATEGORIES[1] if out_rank == 4 else CATEGORIES[0]
    if op in ("Softmax", "Where", "Trilu", "Attention"):  # Attention: the fused op of the onnxruntime target
        return CATEGORIES[1]
    return CATEGORIES[4]


def _macs(op: str, inputs: list[list[int]], output: list[int], weight: list[int] | None) -> float:
    """Multiply-adds of a (Fused)MatMul/Gemm node from its profiled shapes: prod(output) x K."""
    if op == "Gemm" or len(inputs) >= 2:
        k = inputs[0][-1]
    elif weight is not None:
        k = weight[0]
    else:
        return 0.0
    return float(np.prod(output)) * k


def profile_graphs(paths: dict[str, Path], x: np.ndarray, runs: int, work: Path) -> dict[str, Any]:
    """Per-graph node kernel time by category (ORT profiler; sequential executor, so node times add up), plus
    matmul multiply-adds and throughput from the profiled shapes."""
    import onnxruntime as ort

    out = {}
    for name, path in paths.items():
        info = node_info(path)
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(work / f"profile-{name}")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(2):  # warm-up runs are in the trace too; only the last `runs` are counted
            sess.run(None, feeds_of(x))
        walls = []
        for _ in range(runs):
            start = time.perf_counter()
            sess.run(None, feeds_of(x))
            walls.append(time.perf_counter() - start)
        trace = json.loads(Path(sess.end_profiling()).read_text())
        del sess
        run_events = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
        pools = [e["args"]["thread_scheduling_stats"] for e in trace
                 if e.get("cat") == "Node" and "thread_scheduling_stats" in e.get("args", {})]
        threads = max((1 + len(p.get("sub_threads", {})) for p in pools), default=None)
        first_counted = run_events[-runs]["ts"]
        by_cat: dict[str, float] = defaultdict(float)
        by_op: dict[str, float] = defaultdict(float)
        macs = {"linear": 0.0, "attention": 0.0}
        mm_ms = {"linear": 0.0, "attention": 0.0}
        linear_by_rows: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])  # rows -> [macs, ms]
        total = 0.0
        for e in trace:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < first_counted:
                continue
            node = e["name"][: -len("_kernel_time")]
            args = e.get("args", {})
            op = args.get("op_name", "?")
            meta = info.get(node) or info.get(node.split("/")[0]) or {"trace": "", "weight": None}
            inputs = [list(d.values())[0] for d in args.get("input_type_shape", [])]
            outputs = [list(d.values())[0] for d in args.get("output_type_shape", [])]
            out_shape = outputs[0] if outputs else []
            ms = e["dur"] / 1000.0 / runs
            total += ms
            by_op[op] += ms
            category = classify(op, meta["trace"], len(out_shape))
            by_cat[category] += ms
            if category in CATEGORIES[:2] and op in ("MatMul", "FusedMatMul", "Gemm"):
                kind = "linear" if category == CATEGORIES[0] else "attention"
                m = _macs(op, inputs, out_shape, meta["weight"]) / runs
                macs[kind] += m
                mm_ms[kind] += ms
                if kind == "linear" and len(out_shape) == 3:
                    linear_by_rows[out_shape[1]][0] += m
                    linear_by_rows[out_shape[1]][1] += ms
        out[name] = {
            "wall_median_ms": statistics.median(walls) * 1000.0,
            "intra_op_threads_seen": threads,
            "node_total_ms": total,
            "by_category_ms": {c: by_cat.get(c, 0.0) for c in CATEGORIES},
            "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:15]),
            "matmul_gmacs": {k: v / 1e9 for k, v in macs.items()},
            "matmul_gflops_per_s": {k: 2 * macs[k] / 1e6 / mm_ms[k] if mm_ms[k] else None for k in macs},
            "linear_by_rows": {str(r): {"gmacs": v[0] / 1e9, "ms": v[1]} for r, v in sorted(linear_by_rows.items())},
        }
    return out


# --- main ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reductions", type=float, nargs="+", default=[0.4, 0.6, 0.8])
    parser.add_argument("--samples", type=int, default=8, help="calibration subset size (seed 0)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=15, help="timed round-robin rounds")
    parser.add_argument("--profile-runs", type=int, default=3, help="profiled runs per graph; 0: no profile")
    parser.add_argument("--no-twins", action="store_true", help="skip the fixed-count (no scoring) twin graphs")
    parser.add_argument("--no-spin-check", action="store_true",
                        help="skip the second timing pass with ORT thread spinning off")
    parser.add_argument("--no-tiny-export", action="store_true", help="skip timing the full tiny ONNX export")
    parser.add_argument("--quiet-load", type=float, default=0.5, help="wait until the 1-min load average is below")
    parser.add_argument("--max-wait", type=float, default=900.0, help="seconds to wait for that at most")
    parser.add_argument("--work", type=Path, default=None, help="keep recipes/graphs here (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true",
                        help="(development) reuse recipes/graphs already in --work; their times are not measured")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for prefill_latency.{json,md}")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch
    import transformers

    from calibrate.flops import lm_flops_reduction, visual_flops_reduction
    from calibrate.recipe import unpruned_recipe
    from exporter.export import template_image_start
    from visprune.artifacts import tool_versions
    from visprune.models import load_llava

    work = args.work or Path(tempfile.mkdtemp(prefix="prefill-latency-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    t0 = time.perf_counter()

    model_path, build_s = ensure_bench_model()
    print(f"bench model: {model_path} ({'built in %.1f s' % build_s if build_s else 'cached'})", flush=True)

    calibrations = calibrate_recipes(model_path, args.reductions, args.samples, work, args.reuse)
    bundle = load_llava(str(model_path))
    shape = bundle.shape
    image_start = template_image_start(bundle)
    mean_text = statistics.mean(c["recipe"].calibration["mean_text_tokens"] for c in calibrations.values())
    text_after_image = round(mean_text - image_start)  # calibration's text tokens count the prefix too
    text_tokens = image_start + text_after_image
    seq = image_start + shape.num_visual_tokens + text_after_image

    recipes = {"unpruned": unpruned_recipe(shape)}
    recipes.update({f"r{r}": c["recipe"] for r, c in calibrations.items()})
    exports = export_prefills(bundle, recipes, image_start, work, twins=not args.no_twins, reuse=args.reuse)
    del bundle
    tiny_export_s = None if args.no_tiny_export else time_tiny_export(work)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, seq, shape.hidden_size), dtype=np.float32)
    quiet = wait_for_quiet(args.quiet_load, args.max_wait)
    print(f"timing {len(exports)} graphs on inputs_embeds {list(x.shape)}: {args.warmup} warm-up runs each, "
          f"{args.runs} round-robin rounds; load average {quiet['loadavg_1_5_15']}", flush=True)
    paths = {n: e["path"] for n, e in exports.items()}
    measured = measure_latency(paths, x, args.warmup, args.runs, spinning=True)
    if not args.no_spin_check:
        print("again with ORT thread spinning off ...", flush=True)
        nospin = measure_latency(paths, x, args.warmup, args.runs, spinning=False)
        measured["times"].update(nospin["times"])
        measured["rounds"].update(nospin["rounds"])
    load_after = os.getloadavg()
    profile = profile_graphs(paths, x, args.profile_runs, work) if args.profile_runs else None

    times = measured["times"]["steady"]
    base = summarize(times["unpruned"])

    def paired(a: str, b: str, mode: str = "steady") -> tuple[float, float]:
        ratios = [r[a] / r[b] for r in measured["rounds"][mode]]
        return float(np.median(ratios)), float(np.percentile(ratios, 75) - np.percentile(ratios, 25))

    rows = []
    for name, recipe in recipes.items():
        stats = summarize(times[name])
        flops_ratio = 1.0 - lm_flops_reduction(shape, recipe.removed, text_tokens)
        latency_ratio = stats["median_ms"] / base["median_ms"]
        p_med, p_iqr = paired(name, "unpruned")
        row = {
            "graph": name, "reduction_target": recipe.reduction_target, "removed": recipe.removed,
            "keep": recipe.keep, "visual_flops_reduction": visual_flops_reduction(shape, recipe.removed),
            "lm_flops_ratio": flops_ratio, "latency": stats, "latency_ratio": latency_ratio,
            "paired_latency_ratio_median": p_med, "paired_latency_ratio_iqr": p_iqr,
            "ratio_of_ratios": latency_ratio / flops_ratio,
            "goal_met": latency_ratio / flops_ratio <= GOAL,
            "kv_cache_bytes": measured["kv"][name]["bytes"],
            "kv_cache_ratio": measured["kv"][name]["bytes"] / measured["kv"]["unpruned"]["bytes"],
            "kv_tokens_per_layer": measured["kv"][name]["tokens_per_layer"],
            "export_s": exports[name]["export_s"],
            "graph_mb": exports[name]["path"].stat().st_size / 2**20,
            "modes": {},
        }
        for mode, mode_times in measured["times"].items():
            mode_ratio = float(np.median(mode_times[name]) / np.median(mode_times["unpruned"]))
            min_ratio = float(np.min(mode_times[name]) / np.min(mode_times["unpruned"]))
            row["modes"][mode] = {"samples": len(mode_times[name]),
                                  "median_ms": float(np.median(mode_times[name])) * 1000.0,
                                  "p90_ms": float(np.percentile(mode_times[name], 90)) * 1000.0,
                                  "min_ms": float(np.min(mode_times[name])) * 1000.0,
                                  "latency_ratio": mode_ratio, "ratio_of_ratios": mode_ratio / flops_ratio,
                                  "paired_latency_ratio_median": paired(name, "unpruned", mode)[0],
                                  "min_latency_ratio": min_ratio, "min_ratio_of_ratios": min_ratio / flops_ratio}
        if name != "unpruned":
            c = calibrations[recipe.reduction_target]
            row.update(calibration_s=c["wall_s"], calibration_timings=c["timings"], alpha=recipe.alpha)
            twin = f"{name}-fixed"
            if twin in exports:
                t_stats = summarize(times[twin])
                s_med, s_iqr = paired(name, twin)
                row["fixed_count_twin"] = {
                    "latency": t_stats, "latency_ratio": t_stats["median_ms"] / base["median_ms"],
                    "ratio_over_flops_ratio": t_stats["median_ms"] / base["median_ms"] / flops_ratio,
                    "selection_overhead": stats["median_ms"] / t_stats["median_ms"] - 1.0,
                    "paired_selection_overhead_median": s_med - 1.0, "paired_selection_overhead_iqr": s_iqr,
                    "kv_cache_bytes": measured["kv"][twin]["bytes"], "export_s": exports[twin]["export_s"],
                }
        if profile:
            p, u = profile[name], profile["unpruned"]
            row["profile_selection_ms"] = p["by_category_ms"][CATEGORIES[2]] + p["by_category_ms"][CATEGORIES[3]]
            row["profile_selection_share"] = row["profile_selection_ms"] / p["node_total_ms"]
            row["profile_linear_time_ratio"] = p["by_category_ms"][CATEGORIES[0]] / u["by_category_ms"][CATEGORIES[0]]
            row["profile_matmul_macs_ratio"] = (sum(p["matmul_gmacs"].values()) / sum(u["matmul_gmacs"].values()))
        rows.append(row)

    sess_opts = ort.SessionOptions()
    report = {
        "goal": f"latency_ratio <= {GOAL} x lm_flops_ratio",
        "all_goals_met": all(r["goal_met"] for r in rows if r["graph"] != "unpruned"),
        "model": {"path": str(model_path), "built_s": build_s, "lm_shape": shape.__dict__,
                  "vocab_size": bundle_vocab(model_path),
                  "weights": "visprune.models.tiny._seeded_init_(model, TINY_SEED)"},
        "input": {"shape": list(x.shape), "dtype": "float32", "distribution": "standard normal, numpy seed 0",
                  "image_start": image_start, "num_visual_tokens": shape.num_visual_tokens,
                  "text_after_image": text_after_image, "text_tokens_for_flops": text_tokens,
                  "calibration_mean_text_tokens_incl_prefix": mean_text},
        "calibration": {"samples": args.samples, "seed": 0, "device": "cpu", "reused": args.reuse,
                        "wall_s": {str(r): c["wall_s"] for r, c in calibrations.items()}},
        "timing": {"warmup_runs": args.warmup, "timed_rounds": args.runs, "graphs": list(paths),
                   "order": "round-robin over all graphs, start rotating by one each round",
                   "clock": "time.perf_counter around session.run(None, feeds) (all outputs)",
                   "headline_mode": "steady", "modes": {m: MODES[m] for m in measured["times"]}},
        "rows": rows,
        "tiny_full_export_s": tiny_export_s,
        "profile": profile,
        "onnxruntime": {"version": ort.__version__, "providers": ["CPUExecutionProvider"],
                        "intra_op_num_threads": sess_opts.intra_op_num_threads,
                        "inter_op_num_threads": sess_opts.inter_op_num_threads,
                        "execution_mode": str(sess_opts.execution_mode),
                        "graph_optimization_level": str(sess_opts.graph_optimization_level),
                        "note": "default SessionOptions; 0 threads = ORT's choice (one intra-op thread per core)"},
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "processor": _cpu_name(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "transformers": transformers.__version__, **tool_versions("onnx", "onnxscript"),
                    "loadavg_1_5_15_at_start": [round(v, 2) for v in load_start],
                    "loadavg_1_5_15_before_timing": quiet["loadavg_1_5_15"],
                    "loadavg_1_5_15_after_timing": [round(v, 2) for v in load_after],
                    "waited_for_quiet_s": quiet["waited_s"], "quiet_threshold": quiet["threshold"],
                    "quiet_reached": quiet["reached"]},
        "total_wall_s": time.perf_counter() - t0,
        "created_unix": round(time.time(), 3),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill_latency.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    markdown = render_markdown(report)
    (args.out / "prefill_latency.md").write_text(markdown)
    print()
    print(markdown)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def bundle_vocab(model_path: Path) -> int:
    return json.loads((model_path / "config.json").read_text())["text_config"]["vocab_size"]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _threads_seen(r: dict) -> str:
    seen = {p.get("intra_op_threads_seen") for p in (r["profile"] or {}).values()} - {None}
    return f": {', '.join(map(str, sorted(seen)))} threads per the profiler" if seen else ""


def _s(v: float | None) -> str:
    return "reused" if v is None else f"{v:.1f}"


def render_markdown(r: dict) -> str:
    m, inp, s = r["machine"], r["input"], r["model"]["lm_shape"]
    ort_info = r["onnxruntime"]
    pruned = [row for row in r["rows"] if row["graph"] != "unpruned"]
    lines = [
        "# Prefill latency: pruned vs unpruned ONNX prefill graph (CPU, ONNX Runtime)",
        "",
        f"Bench model: `tiny`'s processor and vision tower (N = {s['num_visual_tokens']} visual tokens) with a Llama "
        f"decoder of d = {s['hidden_size']}, MLP {s['intermediate_size']}, {s['num_heads']} heads, "
        f"{s['num_layers']} layers (seeded random weights). Input: inputs_embeds {inp['shape']} float32 "
        f"(P = {inp['image_start']} prefix + N + T = {inp['text_after_image']} text tokens, T = the calibration "
        f"subset's mean). Recipes: `calibrate` on {r['calibration']['samples']} samples, seed 0, CPU.",
        f"ONNX Runtime {ort_info['version']}, CPUExecutionProvider, default session options (intra-op threads "
        f"{ort_info['intra_op_num_threads']} = ORT's choice{_threads_seen(r)}, sequential executor, all graph "
        f"optimisations). "
        f"{r['timing']['warmup_runs']} warm-up runs per graph, then {r['timing']['timed_rounds']} round-robin "
        f"rounds over {len(r['timing']['graphs'])} graphs (start rotating); per visit 3 consecutive runs, the 2nd "
        f"and 3rd timed (`steady`, {r['rows'][0]['modes']['steady']['samples']} samples per graph; see Timing "
        f"modes).",
        f"Machine: {m['cpu_count']} CPUs ({m['processor']}), Python {m['python']}, torch {m['torch']}, "
        f"onnx {m['onnx']}, onnxscript {m['onnxscript']}. 1-min load average before timing "
        f"{m['loadavg_1_5_15_before_timing'][0]} (threshold {m['quiet_threshold']}, waited {m['waited_for_quiet_s']:.0f} "
        f"s, {'reached' if m['quiet_reached'] else 'NOT reached'}); after timing {m['loadavg_1_5_15_after_timing'][0]} "
        f"(includes this benchmark's own ORT threads).",
        "",
        "| graph | removed per layer | visual FLOPs red. | LM FLOPs ratio | median ms | p90 ms | IQR/median "
        "| latency ratio | paired ratio (IQR) | **latency / FLOPs ratio** | KV bytes / request | KV ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lat = row["latency"]
        goal = "" if row["graph"] == "unpruned" else (" ✓" if row["goal_met"] else " ✗")
        lines.append(
            f"| {row['graph']} | {row['removed']} | {row['visual_flops_reduction']:.3f} | {row['lm_flops_ratio']:.3f} "
            f"| {lat['median_ms']:.1f} | {lat['p90_ms']:.1f} | {lat['rel_spread_iqr_over_median']:.1%} "
            f"| {row['latency_ratio']:.3f} | {row['paired_latency_ratio_median']:.3f} "
            f"({row['paired_latency_ratio_iqr']:.3f}) | **{row['ratio_of_ratios']:.3f}**{goal} "
            f"| {row['kv_cache_bytes']:,} | {row['kv_cache_ratio']:.3f} |")
    failed = [row["graph"] for row in pruned if not row["goal_met"]]
    lines += [
        "",
        f"Goal `{r['goal']}`: **{'met for every pruned graph' if not failed else 'NOT met for ' + ', '.join(failed)}**.",
        "",
        "LM FLOPs ratio: whole-decoder matmul multiply-adds, pruned / unpruned, with P + T = "
        f"{inp['text_tokens_for_flops']} non-visual tokens (`calibrate.flops.lm_flops_reduction`; LM head, "
        "embeddings, norms, softmax and other element-wise work not counted). Latency ratio: median pruned / "
        "median unpruned; paired ratio: median over rounds of pruned / unpruned within the same round. "
        "KV bytes: all `present.*` outputs of one request (float32).",
    ]
    modes = list(r["timing"]["modes"])
    if len(modes) > 1:
        lines += [
            "",
            "### Timing modes",
            "",
            "The table above uses `steady`. ONNX Runtime's intra-op threads spin for a while after a run by default; "
            "with several sessions in one process the previous session's spinning thread competes with the next "
            "session's first run for the two cores, which adds a roughly constant delay per switch and so inflates "
            "the ratios of the short (most pruned) graphs. The modes, each with its own round-robin:",
            "",
            *[f"- `{m}`: {d}" for m, d in r["timing"]["modes"].items()],
            "",
            "Per mode: median ms, and latency / FLOPs ratio from the medians and (in brackets) from the minima.",
            "",
            "| graph | " + " | ".join(f"{m} median ms | {m}: latency / FLOPs (min)" for m in modes) + " |",
            "|---|" + "---:|" * (2 * len(modes)),
        ]
        for row in r["rows"]:
            cells = [f"{row['modes'][m]['median_ms']:.1f} | {row['modes'][m]['ratio_of_ratios']:.3f} "
                     f"({row['modes'][m]['min_ratio_of_ratios']:.3f})" for m in modes]
            lines.append(f"| {row['graph']} | " + " | ".join(cells) + " |")
    if any("fixed_count_twin" in row for row in pruned) or r["profile"]:
        lines += [
            "",
            "## Where the gap comes from",
            "",
            "*Fixed-count twin*: the same graph and per-layer token counts, but the dropped tokens are simply the "
            "last visual ones (two Slices + Concat), so no head-max scoring, TopK or Gather. twin / unpruned is "
            "what the token-count reduction alone buys on this CPU; pruned / twin − 1 is the cost of FitPrune's "
            "in-graph selection. *Profile*: ORT node kernel time of the pruned graph in the scoring/TopK nodes "
            "(those traced from `surviving_rows`) and the row gathers (`_take_rows`); *linear time ratio*: "
            "profiled q/k/v/o + MLP + head matmul time, pruned / unpruned; *profiled MACs ratio*: matmul "
            "multiply-adds counted from the profiled shapes, pruned / unpruned (checks the FLOPs model).",
            "",
            "| graph | LM FLOPs ratio | profiled MACs ratio | twin latency ratio | twin / FLOPs ratio "
            "| selection cost (pruned / twin − 1, paired) | profiled scoring + gathers (share) "
            "| linear time ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in pruned:
            t = row.get("fixed_count_twin")
            twin_cells = (f"{t['latency_ratio']:.3f} | {t['ratio_over_flops_ratio']:.3f} | "
                          f"{t['selection_overhead']:+.1%} ({t['paired_selection_overhead_median']:+.1%})"
                          if t else "– | – | –")
            prof_cells = (f"{row['profile_matmul_macs_ratio']:.3f}", f"{row['profile_selection_ms']:.1f} ms "
                          f"({row['profile_selection_share']:.1%})", f"{row['profile_linear_time_ratio']:.3f}") \
                if "profile_selection_ms" in row else ("–", "–", "–")
            lines.append(f"| {row['graph']} | {row['lm_flops_ratio']:.3f} | {prof_cells[0]} | {twin_cells} "
                         f"| {prof_cells[1]} | {prof_cells[2]} |")
    if r["profile"]:
        lines += ["", "ORT profile, node kernel time per run (ms; separate sessions, "
                  "sequential executor):", "",
                  "| graph | wall | nodes | " + " | ".join(CATEGORIES) + " | linear GFLOP/s | attention GFLOP/s |",
                  "|---|---:|---:|" + "---:|" * (len(CATEGORIES) + 2)]
        for name, p in r["profile"].items():
            cats = " | ".join(f"{p['by_category_ms'][c]:.1f}" for c in CATEGORIES)
            g = p["matmul_gflops_per_s"]
            lines.append(f"| {name} | {p['wall_median_ms']:.1f} | {p['node_total_ms']:.1f} | {cats} "
                         f"| {g['linear'] or 0:.1f} | {g['attention'] or 0:.1f} |")
        bins = _throughput_bins(r["profile"])
        if bins:
            lines += ["", "Linear-layer (MatMul with a weight) throughput by the number of token rows it "
                      "multiplies, pooled over all profiled graphs:", "",
                      "| rows | " + " | ".join(b for b, _ in bins) + " |",
                      "|---|" + "---:|" * len(bins),
                      "| GFLOP/s | " + " | ".join(f"{v:.1f}" for _, v in bins) + " |"]
    lines += ["", "## Build, calibration and export times", "", "| step | seconds |", "|---|---:|"]
    if r["model"]["built_s"]:
        lines.append(f"| build bench checkpoint | {r['model']['built_s']:.1f} |")
    for row in pruned:
        lines.append(f"| calibrate {row['graph']} ({r['calibration']['samples']} samples, wall incl. model load) "
                     f"| {_s(row['calibration_s'])} |")
    for row in r["rows"]:
        lines.append(f"| export prefill {row['graph']} ({row['graph_mb']:.0f} MB) | {_s(row['export_s'])} |")
    for row in pruned:
        if "fixed_count_twin" in row:
            lines.append(f"| export prefill {row['graph']}-fixed (twin) | {_s(row['fixed_count_twin']['export_s'])} |")
    if r["tiny_full_export_s"] is not None:
        lines.append(f"| `export_onnx` of the full `tiny` set (vision + prefill + decode + lint + manifest), "
                     f"recipe {TINY_REFERENCE_RECIPE} | {r['tiny_full_export_s']:.1f} |")
    lines.append(f"| whole benchmark run | {r['total_wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def _throughput_bins(profile: dict) -> list[tuple[str, float]]:
    edges = [0, 64, 128, 192, 256, 320, 384, 448, 512, 10**9]
    acc = defaultdict(lambda: [0.0, 0.0])
    for p in profile.values():
        for rows, v in p["linear_by_rows"].items():
            rows = int(rows)
            if rows < 2:
                continue
            i = next(i for i in range(len(edges) - 1) if edges[i] <= rows < edges[i + 1])
            acc[i][0] += v["gmacs"]
            acc[i][1] += v["ms"]
    out = []
    for i in sorted(acc):
        label = f"{edges[i]}–{edges[i + 1] - 1}" if edges[i + 1] < 10**9 else f"≥{edges[i]}"
        out.append((label, 2 * acc[i][0] / acc[i][1] * 1e3))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
