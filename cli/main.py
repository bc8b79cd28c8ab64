"""The `visprune` command line. Each subcommand parses its flags and calls one library function."""

from __future__ import annotations

import _thread
import argparse
import contextlib
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from visprune.errors import VispruneError
from visprune.logs import quiet_third_party_logs
from visprune.methods import MAIN_METHODS, PRUNING_METHODS

INTERNAL_ERROR_EXIT = 70


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    quiet_third_party_logs(args.verbose)
    try:
        with sigterm_as_interrupt():
            return args.handler(args) or 0
    except VispruneError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; nothing was written (an artifact being replaced was kept)", file=sys.stderr)
        return 130
    except Exception:  # a bug, not a user error: always show where
        traceback.print_exc()
        print("error: internal error in visprune (see the traceback above); please report it.", file=sys.stderr)
        return INTERNAL_ERROR_EXIT


class HintingParser(argparse.ArgumentParser):
    """argparse's usage errors (exit 2) end with a `Hint:` line like every other visprune error."""

    command_parsers: dict[str, argparse.ArgumentParser] = {}  # the top-level parser's subcommands, by name

    def parse_args(self, args=None, namespace=None):
        # argparse reports unknown flags from the top-level parser; blame the subcommand they were given to
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            owner = self.command_parsers.get(getattr(parsed, "command", None), self)
            owner.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed

    def error(self, message: str):
        self.print_usage(sys.stderr)
        # a subcommand's parser has prog "visprune <command>"; the top-level one has just "visprune"
        hint = f"Hint: run `{self.prog} --help` to see the options."
        self.exit(2, f"{self.prog}: error: {message}\n{hint}\n")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler, `kill`, `timeout`) unwinds like Ctrl-C, so staging files are removed on the way out."""
    if threading.current_thread() is not threading.main_thread():  # signals can only be set from the main thread
        yield
        return
    previous, previous_hook = signal.signal(signal.SIGTERM, _raise_interrupt), sys.unraisablehook
    sys.unraisablehook = _interrupting_again(previous_hook)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _interrupting_again(previous_hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """Python drops an exception raised in a finalizer (a `__del__`, a weakref callback: "Exception ignored
    in ..."), so an interrupt that lands in one would be lost and the command would run on to the end. Such an
    interrupt is delivered again, as SIGTERM (whose handler is ours here, unlike an ignored SIGINT's), from a
    timer: delivered at once it would land in this hook, where it is dropped too."""
    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            threading.Timer(0.05, _thread.interrupt_main, (signal.SIGTERM,)).start()
        else:
            previous_hook(unraisable)
    return hook


def _int_list(text: str) -> tuple[int, ...]:
    """'640,704,1024' -> (640, 704, 1024), for argparse (a bad item is a usage error naming the flag)."""
    try:
        return tuple(int(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts such as 640,704,1024, not {text!r}")


def _add_force(p) -> None:
    p.add_argument("--force", action="store_true", help="replace --out even if it holds something other than what "
                                                        "this command writes (never an input of the command)")


def _add_verify(p) -> None:
    p.add_argument("--verify", action="store_true", help="re-hash every engine file against its manifest first")


def _parser() -> argparse.ArgumentParser:
    parser = HintingParser(prog="visprune", description="Visual-token pruning for LLaVA, from "
                           "calibration to deployable engines.")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks and library logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=HintingParser)
    _add_calibrate(commands)
    _add_recipe(commands)
    _add_export(commands)
    _add_build(commands)
    _add_run(commands)
    _add_report(commands)
    _add_pipeline(commands)
    _add_eval(commands)
    _add_tradeoff(commands)
    _add_serve(commands)
    _add_export_triton(commands)
    parser.command_parsers = commands.choices
    return parser


def _add_calibrate(commands) -> None:
    p = commands.add_parser("calibrate", help="make a pruning recipe for a FLOPs budget (FitPrune's search or "
                                              "another method)",
                            description="Collect attention statistics on a calibration set and bisect FitPrune's "
                                        "alpha until the recipe removes --reduction of the visual-token FLOPs; "
                                        "other methods take FitPrune's counts or derive theirs from the budget.")
    p.add_argument("--model", default="tiny", help="'tiny', 'tiny-vqa' (embedded) or a local llava-hf checkpoint folder")
    p.add_argument("--reduction", type=float, required=True, help="fraction of visual-token FLOPs to remove, in (0, 1)")
    p.add_argument("--out", type=Path, required=True, help="recipe path, e.g. runs/demo/recipe.json")
    p.add_argument("--method", default="fitprune", metavar="METHOD",
                   help=f"one of {', '.join(PRUNING_METHODS)} (README: Methods); all at the same FLOPs budget")
    data = p.add_argument_group("calibration data")
    data.add_argument("--data", type=Path, help="JSONL with one {image, question} per line (default: embedded set)")
    data.add_argument("--images", type=Path, help="folder the JSONL's image paths resolve against")
    data.add_argument("--samples", type=int, help="use a seeded subset of this many samples")
    data.add_argument("--seed", type=int, default=0)
    run = p.add_argument_group("execution")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--batch-size", type=int, help="samples per replayed batch (default: 2 on CPU, 16 on CUDA)")
    run.add_argument("--no-plot", action="store_true", help="skip the tokens-per-layer PNG")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_force(p)
    p.set_defaults(handler=_run_calibrate)


def _run_calibrate(args) -> int:
    from calibrate import CalibrationConfig, calibrate
    from calibrate.plots import format_recipe_summary

    config = CalibrationConfig(model=args.model, method=args.method, reduction=args.reduction, data=args.data,
                               images=args.images,
                               samples=args.samples, seed=args.seed, device=args.device, batch_size=args.batch_size)
    result = calibrate(config, args.out, plot=not args.no_plot, progress=not args.quiet, force=args.force)
    print(format_recipe_summary(result.recipe))
    print(f"calibration time                {result.timings['total_s']:.1f} s")
    print(f"\nrecipe:     {result.recipe_path}")
    if result.plot_path:
        print(f"plot:       {result.plot_path}")
    print(f"run record: {result.run_record_path}")
    return 0


def _add_recipe(commands) -> None:
    p = commands.add_parser("recipe", help="check, summarise and plot recipes (calibrated or hand-written)")
    p.add_argument("recipes", type=Path, nargs="+", help="recipe JSON files")
    p.add_argument("--model", help="check the recipes against this model: 'tiny', 'llava-1.5-7b' (shapes only) "
                                   "or a checkpoint folder; also computes their FLOPs reductions")
    p.add_argument("--text-tokens", type=float, help="non-visual prompt tokens for the whole-LM FLOPs figure")
    p.add_argument("--plot", type=Path, help="write visual tokens per layer of all recipes to this PNG")
    _add_force(p)
    p.set_defaults(handler=_run_recipe)


def _run_recipe(args) -> int:
    from calibrate import inspect_recipes

    _, summary = inspect_recipes(args.recipes, model=args.model, plot=args.plot, text_tokens=args.text_tokens,
                                 force=args.force)
    print(summary)
    return 0


def _add_export(commands) -> None:
    p = commands.add_parser("export", help="export vision, pruned prefill and decode graphs to ONNX",
                            description="Bake a recipe's per-layer keep counts into the language model and export "
                                        "the ONNX set (linted for TensorRT). Without --recipe: the unpruned model.")
    p.add_argument("--model", default="tiny", help="'tiny', 'tiny-vqa' or a local llava-hf checkpoint folder")
    p.add_argument("--recipe", type=Path, help="recipe JSON (default: unpruned)")
    p.add_argument("--out", type=Path, required=True, help="ONNX set folder, e.g. runs/demo/onnx")
    p.add_argument("--dtype", default="float32", help="float32 (CPU), float16 or bfloat16 (GPU)")
    p.add_argument("--max-seq", type=int, default=2048, help="longest prompt plus generated tokens")
    p.add_argument("--target", default="onnxruntime",
                   help="onnxruntime (fused opset-23 Attention, RMSNorm, RoPE ops; ONNX Runtime and PyTorch engines) or "
                        "tensorrt (standard opset-18 ops in the forms TensorRT fuses; every backend)")
    p.add_argument("--opset", type=int, help="default: the target's (23 for onnxruntime, 18 for tensorrt)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_force(p)
    p.set_defaults(handler=_run_export)


def _run_export(args) -> int:
    from exporter import ExportConfig, export_onnx

    config = ExportConfig(model=args.model, recipe=args.recipe, dtype=args.dtype, target=args.target,
                          opset=args.opset, max_seq=args.max_seq)
    result = export_onnx(config, args.out, progress=not args.quiet, force=args.force)
    recipe = result.manifest.recipe
    print(f"exported {args.out} in {result.manifest.export_seconds:.1f} s "
          f"(recipe {recipe.method}: {recipe.num_visual_tokens} -> {recipe.keep[-1]} visual tokens; lint clean)")
    return 0


def _add_build(commands) -> None:
    p = commands.add_parser("build", help="build engines from an exported ONNX set",
                            description="Build an engine folder: ONNX Runtime (CPU or CUDA), TensorRT (NVIDIA GPU) "
                                        "or the PyTorch engine (static shapes; on CUDA compiled and replayed as "
                                        "CUDA graphs).")
    p.add_argument("--onnx", type=Path, required=True, help="ONNX set folder from `visprune export`")
    p.add_argument("--out", type=Path, required=True, help="engine folder")
    p.add_argument("--backend", default="onnxruntime", help="onnxruntime, tensorrt, pytorch, or auto (TensorRT "
                                                            "where installed with a GPU and the set was exported "
                                                            "--target tensorrt, else onnxruntime)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (onnxruntime, pytorch; TensorRT is always cuda)")
    ort = p.add_argument_group("onnxruntime")
    ort.add_argument("--optimization-level", default="extended", help="disabled, basic, extended or all")
    ort.add_argument("--intra-op-threads", type=int, default=0,
                     help="threads per session (default 0: one per core the serving process may use)")
    ort.add_argument("--spinning", action="store_true",
                     help="intra-op threads spin after a run (one session at a time only: a spinning pool slows the "
                          "next graph's session)")
    trt = p.add_argument_group("tensorrt and pytorch: the shapes an engine is built for")
    trt.add_argument("--max-prompt-tokens", type=int, default=1024, help="longest prompt, image tokens included")
    trt.add_argument("--max-new-tokens", type=int, default=256, help="most tokens generated per request")
    trt.add_argument("--max-batch", type=int, default=8, help="most requests per batch (ONNX Runtime: any)")
    trt = p.add_argument_group("tensorrt")
    trt.add_argument("--workspace-gib", type=float, help="cap TensorRT's workspace memory")
    trt.add_argument("--builder-optimization-level", type=int, default=3, help="0-5 (TensorRT's default: 3)")
    trt.add_argument("--timing-cache", type=Path, help="timing cache file to reuse and update across builds")
    torch_group = p.add_argument_group("pytorch")
    torch_group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                             help="torch.compile the prefill and decode steps at build and load (default: on for "
                                  "--device cuda, off for cpu)")
    torch_group.add_argument("--prompt-buckets", type=_int_list,
                             help="prompt lengths requests are padded up to, comma-separated, the largest being "
                                  "--max-prompt-tokens (default: the shortest prompt plus 32, 64, 128, ... tokens)")
    torch_group.add_argument("--no-cuda-graphs", action="store_true",
                             help="run the compiled steps without replaying them as CUDA graphs")
    p.add_argument("--allow-tf32", action="store_true", help="CUDA: let float32 engines use TF32 matmuls and "
                                                              "convolutions (off by default; recorded in engine.json)")
    _add_force(p)
    p.set_defaults(handler=_run_build)


def _run_build(args) -> int:
    from engines import BuildConfig, build_engine

    config = BuildConfig(backend=args.backend, device=args.device, optimization_level=args.optimization_level, max_prompt_tokens=args.max_prompt_tokens,
                         max_new_tokens=args.max_new_tokens, max_batch=args.max_batch,
                         workspace_gib=args.workspace_gib,
                         builder_optimization_level=args.builder_optimization_level, timing_cache=args.timing_cache,
                         intra_op_threads=args.intra_op_threads, spinning=args.spinning,
                         torch_compile=args.compile, cuda_graphs=not args.no_cuda_graphs,
                         prompt_buckets=args.prompt_buckets, allow_tf32=args.allow_tf32)
    manifest = build_engine(config, args.onnx, args.out, force=args.force)
    version = manifest.onnxruntime_version or manifest.tensorrt_version or ""
    print(f"built {args.out}: {manifest.backend} {version} on {manifest.device}")
    return 0


def _add_run(commands) -> None:
    p = commands.add_parser("run", help="generate text for an image and a prompt over an engine")
    p.add_argument("--engine", type=Path, required=True, help="engine folder from `visprune build`")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--prompt", required=True, help="a question, or a full prompt with one <image>")
    p.add_argument("--max-new-tokens", type=int, default=32)
    sampling = p.add_argument_group("sampling (default: greedy)")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0: greedy; e.g. 0.7")
    sampling.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    sampling.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass")
    sampling.add_argument("--seed", type=int, help="makes a sampled answer repeatable")
    p.add_argument("--stop", action="append", default=[], help="end the answer before this text (repeatable)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is decoded")
    _add_verify(p)
    p.set_defaults(handler=_run_run)


def _run_run(args) -> int:
    from runtime import Pipeline
    from runtime.pipeline import check_max_new_tokens

    from runtime.generation import Sampling

    check_max_new_tokens(args.max_new_tokens)  # bad options fail before the engine is loaded
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    pipe = Pipeline.from_engine_dir(args.engine, verify=args.verify)
    prompt = args.prompt if "<image>" in args.prompt else pipe.chat_prompt(args.prompt)
    if args.stream:
        for piece in pipe.stream(args.image, prompt, args.max_new_tokens, sampling, tuple(args.stop)):
            print(piece, end="", flush=True)
        print()
        return 0
    generation = pipe.generate(args.image, prompt, max_new_tokens=args.max_new_tokens, sampling=sampling,
                               stop=tuple(args.stop))
    print(generation.text)
    t = generation.timings
    print(f"[vision {1e3 * t['vision_s']:.1f} ms, prefill {1e3 * t['prefill_s']:.1f} ms, "
          f"decode {1e3 * t['decode_s_per_token']:.2f} ms/token over {t['decode_tokens']} tokens]", file=sys.stderr)
    return 0


def _add_report(commands) -> None:
    p = commands.add_parser("report", help="parity vs. the PyTorch reference, and latency vs. a baseline engine",
                            description="Parity (default): the engine against the PyTorch reference, and pruned "
                                        "against unpruned. --latency: the engine and --baseline side by side.")
    p.add_argument("--engine", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="report folder")
    parity = p.add_argument_group("parity")
    parity.add_argument("--model", default="tiny", help="the checkpoint the engine was exported from")
    parity.add_argument("--recipe", type=Path, help="check that the engine was exported from this recipe")
    parity.add_argument("--max-new-tokens", type=int, default=8)
    parity.add_argument("--allow-parity-failure", action="store_true", help="exit 0 even if parity fails")
    parity.add_argument("--no-parity", action="store_true", help="skip the parity report")
    for flag, meaning in (("--logits-atol", "logits: absolute tolerance floor"), ("--logits-rtol", "logits: tolerance "
                          "relative to the step's max |reference logit|"), ("--min-kept-overlap", "kept indices: least share "
                          "both keep, per pruning layer"), ("--min-top1", "tokens: least teacher-forced top-1 "
                          "agreement")):
        parity.add_argument(flag, type=float, help=f"{meaning} (default: by the engine's dtype, README)")
    parity.add_argument("--reference", default="auto", choices=("auto", "cpu"),
                        help="auto: PyTorch at the engine's dtype on its device where present, else float32 on "
                             "the CPU; cpu: always float32 on the CPU (use it for the PyTorch backend on CUDA)")
    latency = p.add_argument_group("latency")
    latency.add_argument("--latency", action="store_true", help="write latency.json/.md/.png")
    latency.add_argument("--baseline", type=Path, help="engine to compare with (normally the unpruned one)")
    latency.add_argument("--image", type=Path, help="request image (default: a cat photograph)")
    latency.add_argument("--new-tokens", type=int, default=16, help="tokens generated per timed request")
    latency.add_argument("--warmup", type=int, default=3, help="untimed requests per engine first")
    latency.add_argument("--rounds", type=int, default=10, help="timed requests per engine")
    _add_force(p)
    _add_verify(p)
    p.set_defaults(handler=_run_report)


def _run_report(args) -> int:
    from reports.report import ReportConfig, write_reports

    config = ReportConfig(parity=not args.no_parity, model=args.model, recipe=args.recipe,
                          max_new_tokens=args.max_new_tokens, allow_parity_failure=args.allow_parity_failure,
                          latency=args.latency, baseline=args.baseline, image=args.image, new_tokens=args.new_tokens,
                          warmup=args.warmup, rounds=args.rounds, logits_atol=args.logits_atol,
                          logits_rtol=args.logits_rtol, min_kept_overlap=args.min_kept_overlap, min_top1=args.min_top1,
                          reference=args.reference)
    for path in write_reports(config, args.engine, args.out, force=args.force, verify=args.verify):
        print(path.read_text())
    return 0


def _add_pipeline(commands) -> None:
    p = commands.add_parser("pipeline", help="calibrate, export, build, run and report in one command",
                            description="The whole product on one model: a recipe for --reduction (--method), "
                                        "pruned and unpruned engines, one answer, parity and latency reports, "
                                        "report.md.")
    p.add_argument("--model", default="tiny", help="'tiny', 'tiny-vqa' or a local llava-hf checkpoint folder")
    p.add_argument("--reduction", type=float, default=0.6, help="fraction of visual-token FLOPs to remove")
    p.add_argument("--method", default="fitprune", metavar="METHOD",
                   help=f"one of {', '.join(PRUNING_METHODS)} (README: Methods)")
    p.add_argument("--out", type=Path, required=True, help="run folder, e.g. runs/demo")
    p.add_argument("--backend", default="auto", help="auto (TensorRT where available, else onnxruntime), "
                                                     "onnxruntime, tensorrt or pytorch")
    p.add_argument("--device", default="auto", help="calibration device: auto, cpu, cuda")
    p.add_argument("--data", type=Path, help="calibration JSONL (default: embedded set)")
    p.add_argument("--images", type=Path, help="folder the JSONL's image paths resolve against")
    p.add_argument("--samples", type=int, help="calibrate on a seeded subset of this many samples")
    p.add_argument("--latency-rounds", type=int, default=10)
    p.add_argument("--accuracy-questions", type=int, default=100,
                   help="shapes-vqa models (tiny-vqa): held-out test questions both engines answer for the report's "
                        "pruned vs. unpruned accuracy (default %(default)s; 0: skip); other models have none")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_force(p)
    p.set_defaults(handler=_run_pipeline)


def _run_pipeline(args) -> int:
    from workflows.end_to_end import PipelineConfig, format_summary, run_pipeline

    config = PipelineConfig(model=args.model, reduction=args.reduction, method=args.method, backend=args.backend,
                            device=args.device,
                            data=args.data, images=args.images, samples=args.samples,
                            latency_rounds=args.latency_rounds, accuracy_questions=args.accuracy_questions)
    print(format_summary(run_pipeline(config, args.out, progress=not args.quiet, force=args.force)))
    return 0


def _add_eval(commands) -> None:
    p = commands.add_parser("eval", help="shapes-vqa accuracy of an engine (runtime) or a recipe (PyTorch)",
                            description="Held-out shapes-vqa accuracy, overall and per question type, of --engine "
                                        "(through the runtime) or --recipe (through the PyTorch reference).")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--engine", type=Path, help="engine folder from `visprune build`")
    target.add_argument("--recipe", type=Path, help="recipe JSON, run in PyTorch")
    p.add_argument("--model", default="tiny-vqa", help="the model the recipe is for (PyTorch path)")
    p.add_argument("--out", type=Path, required=True, help="report folder (eval.json, eval.md)")
    p.add_argument("--questions", type=int, default=500, help="held-out test questions")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_force(p)
    _add_verify(p)
    p.set_defaults(handler=_run_eval)


def _run_eval(args) -> int:
    from reports.evaluate import EvalConfig, eval_report

    eval_report(args.out, EvalConfig(questions=args.questions), engine_dir=args.engine, recipe=args.recipe,
                model=args.model, progress=not args.quiet, force=args.force, verify=args.verify)
    print((args.out / "eval.md").read_text())
    return 0


def _add_tradeoff(commands) -> None:
    p = commands.add_parser("tradeoff", help="accuracy (with 95 %% intervals) vs. FLOPs for every pruning method",
                            description="Calibrate FitPrune at each reduction, build every other method at the same "
                                        "visual-FLOPs budget, and score all on held-out shapes-vqa questions; "
                                        "FitPrune's ablations at --ablation-reductions.")
    p.add_argument("--model", default="tiny-vqa")
    p.add_argument("--out", type=Path, default=Path("docs/tradeoff"), help="folder for tradeoff.json/.md/.png")
    p.add_argument("--reductions", type=float, nargs="+", default=[0.4, 0.6, 0.8, 0.9])
    p.add_argument("--methods", nargs="+", default=list(MAIN_METHODS), metavar="METHOD",
                   help=f"any of {', '.join(PRUNING_METHODS)} (default: the non-ablation ones)")
    p.add_argument("--ablation-reductions", type=float, nargs="*", default=[0.6, 0.8],
                   help="budgets of FitPrune's ablations (none: skip them)")
    p.add_argument("--questions", type=int, default=1000)
    p.add_argument("--latency", action="store_true",
                   help="also export every recipe, build it for ONNX Runtime and time its prefill vs. unpruned")
    p.add_argument("--quiet", action="store_true")
    _add_force(p)
    p.set_defaults(handler=_run_tradeoff)


def _run_tradeoff(args) -> int:
    from workflows.tradeoff import TradeoffConfig, tradeoff

    config = TradeoffConfig(model=args.model, reductions=tuple(args.reductions), methods=tuple(args.methods),
                            ablation_reductions=tuple(args.ablation_reductions), questions=args.questions,
                            latency=args.latency)
    tradeoff(config, args.out, progress=not args.quiet, force=args.force)
    print((args.out / "tradeoff.md").read_text())
    return 0


def _add_model_settings(p) -> None:
    g = p.add_argument_group("Triton scheduling (default: dynamic batching of up to 8 requests, 10 ms queue delay)")
    g.add_argument("--max-batch", type=int, help="most requests per batch, and rows per request (default 8)")
    g.add_argument("--max-queue-delay-us", type=int,
                   help="how long a request may wait for others to join its batch (default 10000)")
    g.add_argument("--no-dynamic-batching", action="store_true", help="run every request alone")
    g.add_argument("--instances", type=int, help="pipeline copies, each in its own process (default 1)")
    g.add_argument("--model-name", help="the model's name in Triton's URLs (default visprune)")


def _model_settings(args):
    from serving.triton_repo import ModelSettings

    given = {"name": args.model_name, "max_batch": args.max_batch, "max_queue_delay_us": args.max_queue_delay_us,
             "instances": args.instances, "dynamic_batching": False if args.no_dynamic_batching else None}
    given = {key: value for key, value in given.items() if value is not None}
    return ModelSettings(**given) if given else None


def _add_serve(commands) -> None:
    p = commands.add_parser("serve", help="serve an engine with Triton Inference Server (HTTP, gRPC, metrics)",
                            description="Start Triton Inference Server (the one nvidia-pytriton bundles) in front of "
                                        "an engine: dynamic batching, HTTP and gRPC inference, /v2/health/ready, "
                                        "Prometheus metrics. README: Serve lists the model's tensors. Ctrl-C stops it.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--engine", type=Path, help="engine folder from `visprune build`")
    source.add_argument("--repo", type=Path, help="a model repository from `visprune export-triton` (its "
                                                  "config.pbtxt decides the scheduling)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log-file", type=Path, help="tritonserver's log (default: a temporary file)")
    _add_model_settings(p)
    p.set_defaults(handler=_run_serve)


def _run_serve(args) -> int:
    from serving.server import ServeConfig, serve

    config = ServeConfig(args.http_port, args.grpc_port, args.metrics_port, _model_settings(args), args.log_file)
    serve(config, args.engine, args.repo, on_ready=lambda server: print(server.describe(), flush=True))
    print("stopped", file=sys.stderr)
    return 0


def _add_export_triton(commands) -> None:
    p = commands.add_parser("export-triton", help="write a Triton model repository for an engine (Python backend)",
                            description="Write REPO/<model>/config.pbtxt, REPO/<model>/1/model.py and a copy of the "
                                        "engine, for NVIDIA's tritonserver containers (README: Serve) or "
                                        "`visprune serve --repo`.")
    p.add_argument("--engine", type=Path, required=True, help="engine folder from `visprune build`")
    p.add_argument("--out", type=Path, required=True, help="model repository folder, e.g. runs/demo/triton")
    _add_model_settings(p)
    _add_force(p)
    p.set_defaults(handler=_run_export_triton)


def _run_export_triton(args) -> int:
    from serving.triton_repo import export_triton

    model = export_triton(args.engine, args.out, _model_settings(args), force=args.force)
    print(f"wrote {model} (config.pbtxt, 1/model.py, engine/); try it with `visprune serve --repo {args.out}`")
    return 0


def entry_point() -> None:
    sys.exit(main())

