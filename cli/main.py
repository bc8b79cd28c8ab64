"""The `visprune` command line. Each subcommand parses its flags and calls one library function."""

from __future__ import annotations

import _thread
import argparse
import contextlib
import inspect
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from cli.options import add_config_flags, config_from
from visprune.errors import VispruneError
from visprune.logs import quiet_third_party_logs

INTERNAL_ERROR_EXIT = 70


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser(_command_in(argv)).parse_args(argv)
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


# name: (one-line help, description, the function adding its flags, its handler). A command's flags come from its
# stage's config, whose module is imported only when that command runs (or shows its --help).
COMMANDS: dict[str, tuple[str, str | None, str, str]] = {
    "calibrate": ("make a pruning recipe for a FLOPs budget (FitPrune's search or another method)",
                  "Collect attention statistics on a calibration set and bisect FitPrune's alpha until the recipe "
                  "removes --reduction of the visual-token FLOPs; other methods take FitPrune's counts or derive "
                  "theirs from the budget.", "_add_calibrate", "_run_calibrate"),
    "recipe": ("check, summarise and plot recipes (calibrated or hand-written)", None, "_add_recipe", "_run_recipe"),
    "export": ("export vision, pruned prefill and decode graphs to ONNX",
               "Bake a recipe's per-layer keep counts into the language model and export the ONNX set (linted for "
               "TensorRT). Without --recipe: the unpruned model.", "_add_export", "_run_export"),
    "build": ("build engines from an exported ONNX set",
              "Build an engine folder: ONNX Runtime (CPU or CUDA), TensorRT (NVIDIA GPU) or the PyTorch engine "
              "(static shapes; on CUDA compiled and replayed as CUDA graphs).", "_add_build", "_run_build"),
    "run": ("generate text for an image and a prompt over an engine", None, "_add_run", "_run_run"),
    "report": ("parity vs. the PyTorch reference, and latency vs. a baseline engine",
               "Parity (default): the engine against the PyTorch reference, and pruned against unpruned. "
               "--latency: the engine and --baseline side by side.", "_add_report", "_run_report"),
    "pipeline": ("calibrate, export, build, run and report in one command",
                 "The whole product on one model: a recipe for --reduction (--method), pruned and unpruned engines, "
                 "one answer, parity and latency reports, report.md.", "_add_pipeline", "_run_pipeline"),
    "eval": ("shapes-vqa accuracy of an engine (runtime) or a recipe (PyTorch)",
             "Held-out shapes-vqa accuracy, overall and per question type, of --engine (through the runtime) or "
             "--recipe (through the PyTorch reference).", "_add_eval", "_run_eval"),
    "tradeoff": ("accuracy (with 95 %% intervals) vs. FLOPs for every pruning method",
                 "Calibrate FitPrune at each reduction, build every other method at the same visual-FLOPs budget, "
                 "and score all on held-out shapes-vqa questions; FitPrune's ablations at --ablation-reductions.",
                 "_add_tradeoff", "_run_tradeoff"),
    "serve": ("serve an engine with Triton Inference Server (HTTP, gRPC, metrics)",
              "Start Triton Inference Server (the one nvidia-pytriton bundles) in front of an engine: dynamic "
              "batching, HTTP and gRPC inference, /v2/health/ready, Prometheus metrics. README: Serve lists the "
              "model's tensors. Ctrl-C stops it.", "_add_serve", "_run_serve"),
    "export-triton": ("write a Triton model repository for an engine (Python backend)",
                      "Write REPO/<model>/config.pbtxt, REPO/<model>/1/model.py and a copy of the engine, for "
                      "NVIDIA's tritonserver containers (README: Serve) or `visprune serve --repo`.",
                      "_add_export_triton", "_run_export_triton"),
}


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in `argv` (the top-level options take no values, so it is the first other word)."""
    return next((word for word in argv if not word.startswith("-")), None)


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line, with the flags of `command` only (the others are listed, their stages not imported)."""
    top = HintingParser(prog="visprune", description="Visual-token pruning for LLaVA, from calibration to "
                        "deployable engines.")
    top.add_argument("--version", action="version", version=f"visprune {version()}")
    _add_verbosity(top, default=False)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=HintingParser)
    for name, (summary, description, add, run) in COMMANDS.items():
        p = commands.add_parser(name, help=summary, description=description)
        _add_verbosity(p)
        if name == command:
            globals()[add](p)
            p.set_defaults(handler=globals()[run])
    top.command_parsers = commands.choices
    return top


def version() -> str:
    """The installed distribution's version, or the source tree's when run without installing."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("visprune")
    except PackageNotFoundError:
        from visprune import __version__

        return __version__


def _int_list(text: str) -> tuple[int, ...]:
    """'640,704,1024' -> (640, 704, 1024), for argparse (a bad item is a usage error naming the flag)."""
    try:
        return tuple(int(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts such as 640,704,1024, not {text!r}")


def _utf8_text(text: str) -> str:
    """A flag's text as the shell gave it, refused if its bytes are not UTF-8 (Python keeps such bytes as lone
    surrogates, which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text.encode('utf-8', 'surrogateescape')!r} is not UTF-8 text; set the "
                                         "terminal (or the script) to UTF-8, e.g. LANG=C.UTF-8")
    return text


def _parameter_default(function: Callable, name: str) -> Any:
    return inspect.signature(function).parameters[name].default


def _add_force(p) -> None:
    p.add_argument("--force", action="store_true", help="replace --out even if it holds something other than what "
                                                        "this command writes (never an input of the command)")


def _add_verify(p) -> None:
    p.add_argument("--verify", action="store_true", help="re-hash every engine file against its manifest first")


def _add_verbosity(p, default: Any = argparse.SUPPRESS) -> None:
    """-v/-q before or after the subcommand (the subcommand's copies leave the top-level values unless given)."""
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="show tracebacks and library logs")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="no progress bars or summaries; errors and the `wrote PATH` line still print")


def _wrote(path: Path) -> None:
    """The result line of every command that writes, printed even with --quiet."""
    print(f"wrote {path}")


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text)


def _model_help(what: str) -> str:
    return f"{what}: 'tiny', 'tiny-vqa', 'tiny-next' (embedded) or a local llava-hf LLaVA-1.5 or NeXT folder"


def _add_calibrate(p) -> None:
    from calibrate import CalibrationConfig

    add_config_flags(p, CalibrationConfig, {
        "model": _model_help("the model to calibrate"),
        "reduction": "fraction of visual-token FLOPs to remove, in (0, 1)",
        "method": "pruning method (README: Methods); all at the same FLOPs budget",
        "budget_policy": "LLaVA-NeXT only: how the counts meet an image's own N: ratio (FitPrune's NeXT scaling) or "
                         "absolute (the same kept counts for every image) (default: ratio; absolute for dart, "
                         "divprune, adaptprune, whose selections unroll one step per kept token)"},
        required=("reduction",))
    p.add_argument("--out", type=Path, required=True, help="recipe path, e.g. runs/demo/recipe.json")
    add_config_flags(p.add_argument_group("calibration data"), CalibrationConfig, {
        "data": "JSONL with one {image, question} per line (default: the model's embedded set)",
        "images": "folder the JSONL's image paths resolve against (default: the JSONL's folder)",
        "samples": "use a seeded subset of this many samples (default: all)",
        "seed": "seed of the subset and of random methods"})
    run = p.add_argument_group("execution")
    add_config_flags(run, CalibrationConfig, {
        "device": "auto, cpu, cuda or cuda:N",
        "batch_size": "samples per replayed batch (default: 2 on CPU, 16 on CUDA)"})
    run.add_argument("--no-plot", action="store_true", help="skip the tokens-per-layer PNG")
    _add_force(p)


def _run_calibrate(args) -> int:
    from calibrate import CalibrationConfig, calibrate
    from calibrate.plots import format_recipe_summary

    result = calibrate(config_from(args, CalibrationConfig), args.out, plot=not args.no_plot,
                       progress=not args.quiet, force=args.force)
    _say(args, format_recipe_summary(result.recipe))
    _say(args, f"calibration time                {result.timings['total_s']:.1f} s\n")
    for path in (result.plot_path, result.run_record_path, result.recipe_path):
        if path:
            _wrote(path)
    return 0


def _add_recipe(p) -> None:
    p.add_argument("recipes", type=Path, nargs="+", help="recipe JSON files")
    p.add_argument("--model", help="check the recipes against this model: 'tiny', 'tiny-vqa', 'llava-1.5-7b' (shapes "
                                   "only) or a checkpoint folder; also computes their FLOPs reductions (default: no "
                                   "check)")
    p.add_argument("--text-tokens", type=float, help="non-visual prompt tokens for the whole-LM FLOPs "
                                                               "figure (default: the recipe's calibration mean)")
    p.add_argument("--plot", type=Path, help="write visual tokens per layer of all recipes to this PNG (default: "
                                             "no plot)")
    _add_force(p)


def _run_recipe(args) -> int:
    from calibrate import inspect_recipes

    _, summary = inspect_recipes(args.recipes, model=args.model, plot=args.plot, text_tokens=args.text_tokens,
                                 force=args.force)
    _say(args, summary)
    if args.plot:
        _wrote(args.plot)
    return 0


def _add_export(p) -> None:
    from exporter import ExportConfig

    add_config_flags(p, ExportConfig, {"model": _model_help("the checkpoint to export"),
                                       "recipe": "recipe JSON (default: unpruned)"})
    p.add_argument("--out", type=Path, required=True, help="ONNX set folder, e.g. runs/demo/onnx")
    add_config_flags(p, ExportConfig, {
        "dtype": "graph dtype: float32 (CPU), float16 or bfloat16 (GPU)",
        "max_seq": "longest prompt plus generated tokens (default: 2048; 4096 for a LLaVA-NeXT model)",
        "target": "onnxruntime: fused opset-23 Attention, RMSNorm, RoPE ops (ONNX Runtime and PyTorch engines); "
                  "tensorrt: standard opset-18 ops in the forms TensorRT fuses (every backend)",
        "opset": "ONNX opset (default: the target's, 23 for onnxruntime, 18 for tensorrt)"})
    _add_force(p)


def _run_export(args) -> int:
    from exporter import ExportConfig, export_onnx

    result = export_onnx(config_from(args, ExportConfig), args.out, progress=not args.quiet, force=args.force)
    recipe = result.manifest.recipe
    _say(args, f"exported in {result.manifest.export_seconds:.1f} s (recipe {recipe.method}: "
               f"{recipe.num_visual_tokens} -> {recipe.keep[-1]} visual tokens; lint clean)")
    _wrote(args.out)
    return 0


def _add_build(p) -> None:
    from engines import BuildConfig

    p.add_argument("--onnx", type=Path, required=True, help="ONNX set folder from `visprune export`")
    p.add_argument("--out", type=Path, required=True, help="engine folder")
    add_config_flags(p, BuildConfig, {
        "backend": "auto: TensorRT where installed with a GPU and the set was exported --target tensorrt, else "
                   "onnxruntime",
        "device": "onnxruntime and pytorch (TensorRT is always cuda)"})
    add_config_flags(p.add_argument_group("onnxruntime"), BuildConfig, {
        "optimization_level": "ONNX Runtime graph optimizations",
        "intra_op_threads": "threads per session (0: one per core the serving process may use)",
        "spinning": "intra-op threads spin after a run (one session at a time only: a spinning pool slows the "
                    "next graph's session)"})
    add_config_flags(p.add_argument_group("tensorrt and pytorch: the shapes an engine is built for"), BuildConfig, {
        "max_prompt_tokens": "longest prompt, image tokens included",
        "max_new_tokens": "most tokens generated per request",
        "max_batch": "most requests per batch (ONNX Runtime: any)"})
    add_config_flags(p.add_argument_group("tensorrt"), BuildConfig, {
        "workspace_gib": "cap TensorRT's workspace memory (default: TensorRT's, the GPU's memory)",
        "builder_optimization_level": "0-5 (3 is TensorRT's own default)",
        "timing_cache": "timing cache file to reuse and update across builds (default: none)"})
    add_config_flags(p.add_argument_group("pytorch"), BuildConfig, {
        "torch_compile": "torch.compile the prefill and decode steps at build and load (default: on for --device "
                         "cuda, off for cpu)",
        "prompt_buckets": "prompt lengths requests are padded up to, comma-separated, the largest being "
                          "--max-prompt-tokens (default: the shortest prompt plus 32, 64, 128, ... tokens)",
        "cuda_graphs": "run the compiled steps without replaying them as CUDA graphs"},
        flags={"torch_compile": "--compile"}, parse={"prompt_buckets": _int_list})
    add_config_flags(p, BuildConfig, {"allow_tf32": "CUDA: let float32 engines use TF32 matmuls and convolutions "
                                                    "(recorded in engine.json)"})
    _add_force(p)


def _run_build(args) -> int:
    from engines import BuildConfig, build_engine

    manifest = build_engine(config_from(args, BuildConfig), args.onnx, args.out, force=args.force)
    version = manifest.onnxruntime_version or manifest.tensorrt_version or ""
    _say(args, f"built {manifest.backend} {version} engine on {manifest.device}")
    _wrote(args.out)
    return 0


def _add_run(p) -> None:
    from runtime.generation import Sampling
    from runtime.pipeline import Pipeline

    p.add_argument("--engine", type=Path, required=True, help="engine folder from `visprune build`")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--prompt", type=_utf8_text, required=True, help="a question, or a full prompt with one <image>")
    p.add_argument("--max-new-tokens", type=int, default=_parameter_default(Pipeline.generate, "max_new_tokens"),
                   help="most tokens generated (default: %(default)s)")
    add_config_flags(p.add_argument_group("sampling (greedy unless --temperature is above 0)"), Sampling, {
        "temperature": "0: greedy; e.g. 0.7", "top_k": "sample among the k most likely (0: all)",
        "top_p": "sample within this probability mass", "seed": "makes a sampled answer repeatable (default: none)"})
    p.add_argument("--stop", action="append", type=_utf8_text, default=[],
                   help="end the answer before this text (repeatable; default: none)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is decoded")
    _add_verify(p)


def _run_run(args) -> int:
    from runtime import Pipeline
    from runtime.generation import Sampling
    from runtime.pipeline import check_max_new_tokens

    check_max_new_tokens(args.max_new_tokens)  # bad options fail before the engine is loaded
    sampling = config_from(args, Sampling)
    pipe = Pipeline.from_engine_dir(args.engine, verify=args.verify)
    prompt = args.prompt if "<image>" in args.prompt else pipe.chat_prompt(args.prompt)
    request = (args.image, prompt, args.max_new_tokens, sampling, tuple(args.stop))
    if args.stream:
        timings: dict[str, float] = {}
        for piece in pipe.stream(*request, timings=timings):
            print(piece, end="", flush=True)
        print()
    else:
        generation = pipe.generate(*request[:2], max_new_tokens=args.max_new_tokens, sampling=sampling,
                                   stop=tuple(args.stop))
        print(generation.text)
        timings = generation.timings
    if not args.quiet:
        print(f"[vision {1e3 * timings['vision_s']:.1f} ms, prefill {1e3 * timings['prefill_s']:.1f} ms, decode "
              f"{1e3 * timings['decode_s_per_token']:.2f} ms/token over {timings['decode_tokens']} tokens]",
              file=sys.stderr)
    return 0


def _add_report(p) -> None:
    from reports.report import ReportConfig

    p.add_argument("--engine", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="report folder")
    add_config_flags(p.add_argument_group("parity"), ReportConfig, {
        "model": _model_help("parity's PyTorch reference (default: the checkpoint the engine's manifest names)"),
        "recipe": "check that the engine was exported from this recipe (default: no check)",
        "max_new_tokens": "tokens generated per parity prompt",
        "allow_parity_failure": "exit 0 even if parity fails",
        "parity": "skip the parity report",
        "logits_atol": "logits: absolute tolerance floor (default: by the engine's dtype, README)",
        "logits_rtol": "logits: tolerance relative to the step's max |reference logit| (default: by the engine's "
                       "dtype, README)",
        "min_kept_overlap": "kept indices: least share both keep, per pruning layer (default: by the engine's dtype)",
        "min_top1": "tokens: least teacher-forced top-1 agreement (default: by the engine's dtype)",
        "reference": "auto: PyTorch at the engine's dtype on its device where present, else float32 on the CPU; "
                     "cpu: always float32 on the CPU (use it for the PyTorch backend on CUDA)"})
    add_config_flags(p.add_argument_group("latency"), ReportConfig, {
        "latency": "write latency.json/.md/.png",
        "baseline": "engine to compare with, normally the unpruned one (default: none; --latency needs one)",
        "image": "request image (default: a cat photograph)",
        "new_tokens": "tokens generated per timed request",
        "warmup": "untimed requests per engine first",
        "rounds": "timed requests per engine"})
    _add_force(p)
    _add_verify(p)


def _run_report(args) -> int:
    from reports.report import ReportConfig, write_reports

    for path in write_reports(config_from(args, ReportConfig), args.engine, args.out, force=args.force,
                              verify=args.verify):
        _say(args, path.read_text())
    _wrote(args.out)
    return 0


def _add_pipeline(p) -> None:
    from workflows.end_to_end import PipelineConfig

    add_config_flags(p, PipelineConfig, {
        "model": _model_help("the model"),
        "reduction": "fraction of visual-token FLOPs to remove",
        "method": "pruning method (README: Methods)"})
    p.add_argument("--out", type=Path, required=True, help="run folder, e.g. runs/demo")
    add_config_flags(p, PipelineConfig, {
        "backend": "auto: TensorRT where available, else onnxruntime",
        "device": "calibration device: auto, cpu, cuda",
        "data": "calibration JSONL (default: the model's embedded set)",
        "images": "folder the JSONL's image paths resolve against (default: the JSONL's folder)",
        "samples": "calibrate on a seeded subset of this many samples (default: all)",
        "latency_rounds": "timed requests per engine",
        "accuracy_questions": "shapes-vqa models (tiny-vqa): held-out test questions both engines answer for the "
                              "report's pruned vs. unpruned accuracy (0: skip); other models have none"})
    _add_force(p)


def _run_pipeline(args) -> int:
    from workflows.end_to_end import PipelineConfig, format_summary, run_pipeline

    result = run_pipeline(config_from(args, PipelineConfig), args.out, progress=not args.quiet, force=args.force)
    _say(args, format_summary(result))
    _wrote(args.out)
    return 0


def _add_eval(p) -> None:
    from reports.evaluate import EvalConfig
    from visprune.models.llava import DEFAULT_MODEL

    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--engine", type=Path, help="engine folder from `visprune build`")
    target.add_argument("--recipe", type=Path, help="recipe JSON, run in PyTorch")
    p.add_argument("--model", help=f"the model the recipe is for (default: {DEFAULT_MODEL}; an engine's is the one "
                                   "its manifest names)")
    p.add_argument("--out", type=Path, required=True, help="report folder (eval.json, eval.md)")
    add_config_flags(p, EvalConfig, {"questions": "held-out test questions"})
    _add_force(p)
    _add_verify(p)


def _run_eval(args) -> int:
    from reports.evaluate import EvalConfig, eval_report

    report = eval_report(args.out, config_from(args, EvalConfig), engine_dir=args.engine, recipe=args.recipe,
                         model=args.model, progress=not args.quiet, force=args.force, verify=args.verify)
    _say(args, (args.out / "eval.md").read_text())
    accuracy = report["accuracy"]
    low, high = accuracy["ci95"]
    print(f"accuracy {accuracy['overall']:.1%} of {accuracy['n']} questions (95 % interval {low:.1%} to {high:.1%})")
    _wrote(args.out)
    return 0


def _add_tradeoff(p) -> None:
    from workflows.tradeoff import TradeoffConfig

    add_config_flags(p, TradeoffConfig, {"model": _model_help("a shapes-vqa model")})
    p.add_argument("--out", type=Path, default=Path("runs/tradeoff"),
                   help="folder for tradeoff.json/.md/.png (default: %(default)s; the committed study is docs/tradeoff)")
    add_config_flags(p, TradeoffConfig, {
        "reductions": "FLOPs budgets every method is scored at (0, unpruned, always is)",
        "methods": "methods scored at every budget",
        "ablation_reductions": "budgets of FitPrune's ablations (none: skip them)",
        "questions": "held-out test questions per row",
        "latency": "also export every recipe, build it for ONNX Runtime and time its prefill vs. unpruned"},
        nargs={"ablation_reductions": "*"})
    _add_force(p)


def _run_tradeoff(args) -> int:
    from workflows.tradeoff import TradeoffConfig, tradeoff

    tradeoff(config_from(args, TradeoffConfig), args.out, progress=not args.quiet, force=args.force)
    _say(args, (args.out / "tradeoff.md").read_text())
    _wrote(args.out)
    return 0


def _add_model_settings(p) -> None:
    from serving.triton_repo import ModelSettings

    d = ModelSettings()  # flags left out keep these (an engine) or the repository's config.pbtxt (--repo)
    g = p.add_argument_group("Triton scheduling (an exported repository brings its own)")
    g.add_argument("--max-batch", type=int, help=f"most requests per batch, and rows per request (default: "
                                                 f"{d.max_batch})")
    g.add_argument("--max-queue-delay-us", type=int, help="how long a request may wait for others to join its "
                                                          f"batch (default: {d.max_queue_delay_us})")
    g.add_argument("--no-dynamic-batching", action="store_true", help="run every request alone")
    g.add_argument("--instances", type=int, help=f"pipeline copies, each in its own process (default: {d.instances})")
    g.add_argument("--model-name", help=f"the model's name in Triton's URLs (default: {d.name})")


def _model_settings(args):
    from serving.triton_repo import ModelSettings

    given = {"name": args.model_name, "max_batch": args.max_batch, "max_queue_delay_us": args.max_queue_delay_us,
             "instances": args.instances, "dynamic_batching": False if args.no_dynamic_batching else None}
    given = {key: value for key, value in given.items() if value is not None}
    return ModelSettings(**given) if given else None


def _add_serve(p) -> None:
    from serving.server import ServeConfig

    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--engine", type=Path, help="engine folder from `visprune build`")
    source.add_argument("--repo", type=Path, help="a model repository from `visprune export-triton` (its "
                                                  "config.pbtxt decides the scheduling)")
    add_config_flags(p, ServeConfig, {"http_port": "HTTP endpoint's port", "grpc_port": "gRPC endpoint's port",
                                      "metrics_port": "Prometheus metrics' port",
                                      "log_file": "tritonserver's log (default: a temporary file)"})
    _add_model_settings(p)


def _run_serve(args) -> int:
    from serving.server import ServeConfig, serve

    config = config_from(args, ServeConfig, settings=_model_settings(args))
    serve(config, args.engine, args.repo, on_ready=lambda server: print(server.describe(), flush=True))
    print("stopped", file=sys.stderr)
    return 0


def _add_export_triton(p) -> None:
    p.add_argument("--engine", type=Path, required=True, help="engine folder from `visprune build`")
    p.add_argument("--out", type=Path, required=True, help="model repository folder, e.g. runs/demo/triton")
    _add_model_settings(p)
    _add_force(p)


def _run_export_triton(args) -> int:
    from serving.triton_repo import export_triton

    model = export_triton(args.engine, args.out, _model_settings(args), force=args.force)
    _say(args, f"try it with `visprune serve --repo {args.out}`")
    _wrote(model)
    return 0


def entry_point() -> None:
    sys.exit(main())

