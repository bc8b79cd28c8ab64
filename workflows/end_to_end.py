"""`run_pipeline(config, out)`: the whole product in one call, as `visprune pipeline` runs it.

calibrate -> export (pruned, and the unpruned baseline) -> build (TensorRT where available, else ONNX Runtime;
batch 1) -> parity report -> run one sample request on both engines -> (shapes-vqa models: accuracy of both
engines on held-out questions) -> latency report -> report.md with the plots. Parity runs first so that its
PyTorch reference is gone before the unpruned engine opens; each engine opens once for all its stages. The
unpruned export does not depend on the recipe, so it runs in a second process while calibration and the pruned
export run here (its TensorRT build waits for the pruned one: TensorRT times its kernels on the GPU, and two
builds at once would skew each other's choices).

The sample request: for a shapes-vqa model (`tiny-vqa`) a held-out test scene and its question, so the answer can
be checked against the expected one; for any other model a photograph and SAMPLE_QUESTION. The accuracy sample is
the first `accuracy_questions` test questions (as `visprune eval --questions N` takes them), answered through the
two built engines the way `visprune eval --engine` answers.

Layout of `out`: recipe.json/.png, onnx/, onnx-unpruned/, engine/, engine-unpruned/, sample.png,
report/{parity,latency}.{json,md}, report/*.png, report.md, pipeline.json (config, stage times, headline figures).
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from calibrate import CalibrationConfig, calibrate
from calibrate.stage import resolve_device
from engines import BuildConfig, auto_backend, build_engine
from engines.build import DEFAULT_BACKEND
from exporter import ExportConfig, export_onnx
from visprune.artifacts import atomic_write_bytes, atomic_write_json
from visprune.backends import BACKEND_CHOICES
from visprune.errors import ConfigError
from visprune.manifests import schema_ids
from visprune.manifests.reports import LatencyReport, ParityReport
from visprune.methods import PRUNING_METHODS
from visprune.models.llava import DEFAULT_MODEL, model_folder, resolve_model_path
from visprune.outputs import PIPELINE_RUN, check_output, writing_in_place

SAMPLE_QUESTION = "What animal is this?"
SAMPLE_TEST_INDEX = 0  # shapes-vqa models: the sample request is this test-split sample
ACCURACY_TEST_START = 0  # shapes-vqa models: the accuracy sample starts at this test-split index
SHAPES_VQA_MODELS = ("tiny-vqa",)
PIPELINE_SCHEMA = schema_ids.PIPELINE_RUN


@dataclass(frozen=True)
class PipelineConfig:
    VERSION = 1
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"backend": BACKEND_CHOICES, "method": PRUNING_METHODS}

    model: str = DEFAULT_MODEL
    reduction: float = 0.6
    method: str = "fitprune"  # any pruning method of visprune/methods.py
    backend: str = DEFAULT_BACKEND  # visprune/backends.py BACKEND_CHOICES
    device: str = "auto"  # calibration device
    data: Path | None = None
    images: Path | None = None
    samples: int | None = None
    max_new_tokens: int = 16
    latency_rounds: int = 10
    parity_prompts: int = 8
    accuracy_questions: int = 100  # held-out shapes-vqa test questions per engine (shapes-vqa models only); 0: none

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_CHOICES:
            raise ConfigError(f"Unknown backend {self.backend!r}.", f"Use one of: {', '.join(BACKEND_CHOICES)}.")
        CalibrationConfig(model=self.model, method=self.method, reduction=self.reduction, device=self.device,
                          samples=self.samples)
        for name in ("max_new_tokens", "latency_rounds", "parity_prompts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.",
                                  "Leave it out for the default.")
        if self.accuracy_questions < 0:
            raise ConfigError(f"--accuracy-questions must be 0 or more, got {self.accuracy_questions}.",
                              "Pass 0 to skip the accuracy sample, or leave it out for the default.")

    @property
    def shapes_vqa(self) -> bool:
        """Whether the model answers shapes-vqa (its sample request and accuracy sample come from that task)."""
        return self.model in SHAPES_VQA_MODELS

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, **{k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}}


@dataclass
class PipelineResult:
    out_dir: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    question: str = ""  # the sample request's
    expected: str | None = None  # its expected answer (shapes-vqa models), else None
    answer: str = ""  # the pruned engine's
    unpruned_answer: str = ""


def run_pipeline(config: PipelineConfig, out_dir: Path, progress: bool = True, force: bool = False) -> PipelineResult:
    """Every stage into the run folder `out_dir`, checked before any work (visprune/outputs.py). The run records
    its own paths, so it is written in place: an old run is kept aside until the new one is complete."""
    out = Path(out_dir)
    check_output(out, PIPELINE_RUN, inputs=[config.data, config.images, model_folder(config.model)], force=force)
    resolve_device(config.device)  # no CUDA for --device cuda: fail before two processes start working
    with writing_in_place(out):
        result = _run_stages(config, out, progress)
    if not result.figures["parity_passed"]:  # raised after the run is in place: its reports explain the failure
        from reports.parity import ParityError

        raise ParityError("The engine does not match the PyTorch reference.",
                          f"See {out / 'report' / 'parity.md'}; the rest of the run is in {out}.")
    return result


def _run_stages(config: PipelineConfig, out: Path, progress: bool) -> PipelineResult:
    result = PipelineResult(out)
    backend = auto_backend() if config.backend == "auto" else config.backend
    dtype = "float16" if backend == "tensorrt" else "float32"
    resolve_model_path(config.model)  # builds `tiny` once here, before two processes could race to build it
    target = "tensorrt" if backend == "tensorrt" else "onnxruntime"
    export = ExportConfig(model=config.model, dtype=dtype, target=target)
    overlap_build = backend != "tensorrt"  # TensorRT times kernels on the GPU: two builds at once skew both
    with InBackground(_export_and_build, export, backend if overlap_build else None, out / "onnx-unpruned",
                      out / "engine-unpruned", cleanup=lambda: _remove_staging(out)) as baseline:
        with _stage(result, "calibrate"):
            calibrate(CalibrationConfig(model=config.model, method=config.method, reduction=config.reduction,
                                        device=config.device,
                                        data=config.data, images=config.images, samples=config.samples),
                      out / "recipe.json", progress=progress)
        with _stage(result, "export + build (pruned)"):
            _export_and_build(ExportConfig(model=config.model, recipe=out / "recipe.json", dtype=dtype,
                                           target=target), backend, out / "onnx", out / "engine", progress)
        with _stage(result, "export + build (unpruned, overlapped)"):
            baseline.result()
    if not overlap_build:
        with _stage(result, "build (unpruned, after the pruned one)"):
            _build(backend, out / "onnx-unpruned", out / "engine-unpruned")
    _run_and_report(config, result, progress)
    atomic_write_json(out / PIPELINE_SCHEMA.file, {"schema": PIPELINE_SCHEMA[0], "schema_version": PIPELINE_SCHEMA[1],
                                              "config": config.to_dict(), "backend": backend, "answer": result.answer,
                                              "sample": _sample_record(result), "stage_seconds": result.stage_seconds,
                                              "figures": result.figures})
    return result


def format_summary(result: PipelineResult) -> str:
    """The table `visprune pipeline` ends with."""
    f = result.figures
    rows = [(name, f"{seconds:.1f} s") for name, seconds in result.stage_seconds.items()]
    rows += [("total", f"{sum(result.stage_seconds.values()):.1f} s"), ("", ""),
             ("visual tokens", f["visual_tokens"]), ("visual-FLOPs reduction", f"{f['visual_flops_reduction']:.1%}"),
             ("whole-LM FLOPs ratio", f"{f['lm_flops_ratio']:.3f}"),
             ("prefill latency ratio", f"{f['prefill_latency_ratio']:.3f} ({f['prefill_speedup']:.2f}x faster)"),
             ("KV-cache bytes ratio", f"{f['kv_bytes_ratio']:.3f}"),
             ("parity vs. PyTorch", f"{'passed' if f['parity_passed'] else 'FAILED'} "
                                    f"(max abs logits error {f['max_abs_logits_error']:.1e})"),
             ("", ""), ("sample question", result.question)]
    if result.expected is not None:
        rows.append(("expected answer", repr(result.expected)))
    rows += [("pruned engine's answer", repr(result.answer)),
             ("unpruned engine's answer", repr(result.unpruned_answer))]
    if "accuracy" in f:
        a = f["accuracy"]
        rows += [("", ""), ("shapes-vqa accuracy", f"held-out {_question_range(a)}")]
        rows += [(f"  {engine} engine", _accuracy_text(a[engine])) for engine in ("pruned", "unpruned")]
    rows += [("", ""), ("report", str(result.out_dir / "report.md"))]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _accuracy_text(accuracy: dict[str, Any]) -> str:
    low, high = accuracy["ci95"]
    return f"{accuracy['overall']:.1%} right of {accuracy['n']} (95 % CI {low:.1%}-{high:.1%})"


def _question_range(accuracy: dict[str, Any]) -> str:
    first = accuracy["start"]
    return f"{accuracy['split']} questions {first}-{first + accuracy['questions'] - 1}"


def _sample_record(result: PipelineResult) -> dict[str, Any]:
    return {"question": result.question, "expected": result.expected, "pruned_answer": result.answer,
            "unpruned_answer": result.unpruned_answer}


def _export_and_build(export: ExportConfig, backend: str | None, onnx_dir: Path, engine_dir: Path,
                      progress: bool = False) -> None:
    """Export, then build with `backend` (None: export only)."""
    export_onnx(export, onnx_dir, progress=progress)
    if backend:
        _build(backend, onnx_dir, engine_dir)


def _build(backend: str, onnx_dir: Path, engine_dir: Path) -> None:
    """max_batch 1: the pipeline runs one request at a time, and a TensorRT engine sized for batch 8 holds KV
    buffers and context memory for 8 (~10 GB more at 7B)."""
    device = "cuda" if backend == "tensorrt" else "cpu"
    build_engine(BuildConfig(backend=backend, device=device, max_prompt_tokens=1024, max_new_tokens=256,
                             max_batch=1), onnx_dir, engine_dir)


def _sample_request(config: PipelineConfig):
    """(image, question, expected answer or None) of the request the pipeline runs."""
    if config.shapes_vqa:
        from visprune.tasks.shapes_vqa import make_sample

        sample = make_sample("test", SAMPLE_TEST_INDEX)
        return sample.image(), sample.question, sample.answer
    from reports.latency import default_latency_image

    return default_latency_image(), SAMPLE_QUESTION, None


def _accuracy(config: PipelineConfig, pipes: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Both engines' shapes-vqa accuracy (with 95 % intervals) on the same held-out test questions; `pipes`: the
    open "pruned" and "unpruned" Pipelines."""
    from reports.evaluate import EvalConfig, answers_from_engine
    from visprune.tasks.shapes_vqa import accuracy_by_type, make_split

    samples = make_split("test", config.accuracy_questions, start=ACCURACY_TEST_START)
    max_new_tokens = EvalConfig().max_new_tokens  # as `visprune eval` answers
    figures: dict[str, Any] = {"task": "shapes-vqa", "split": "test", "start": ACCURACY_TEST_START,
                               "questions": config.accuracy_questions, "max_new_tokens": max_new_tokens}
    for engine in ("pruned", "unpruned"):
        answers = answers_from_engine(pipes[engine], samples, max_new_tokens, progress=progress)
        figures[engine] = accuracy_by_type(samples, answers)
    return figures


def _run_and_report(config: PipelineConfig, result: PipelineResult, progress: bool = False) -> None:
    parity, latency, accuracy = _engine_stages(config, result, progress)
    result.figures = _headline(result.out_dir, parity, latency)
    if accuracy is not None:
        result.figures["accuracy"] = accuracy
    atomic_write_bytes(result.out_dir / "report.md", report_markdown(result, parity, latency).encode())


def _engine_stages(config: PipelineConfig, result: PipelineResult, progress: bool = False):
    """Parity, the sample request, accuracy, latency and the plots over the two engines: (parity, latency,
    accuracy or None). GPU memory at 7B: each engine is opened once and handed to every stage that uses it, and
    the parity reference (a float16 PyTorch copy of the model) is freed before the unpruned engine opens, so at
    most two of the three are resident at a time."""
    from reports.latency import latency_report
    from reports.parity import default_parity_prompts, parity_report
    from runtime.pipeline import Pipeline

    out = result.out_dir
    image, result.question, result.expected = _sample_request(config)
    image.save(out / "sample.png")
    pipes = {"pruned": Pipeline.from_engine_dir(out / "engine")}
    with _stage(result, "parity report"):
        parity = parity_report(pipes["pruned"], config.model, out / "report", recipe=out / "recipe.json",
                               prompts=default_parity_prompts(config.parity_prompts), allow_failure=True)
    free_device_memory()  # the reference went out of scope with parity_report: hand its memory back
    with _stage(result, "run (one request, both engines)"):
        pipes["unpruned"] = Pipeline.from_engine_dir(out / "engine-unpruned")
        answers = {name: pipe.generate(out / "sample.png", pipe.chat_prompt(result.question), config.max_new_tokens)
                   for name, pipe in pipes.items()}
        result.answer, result.unpruned_answer = answers["pruned"].text, answers["unpruned"].text
    accuracy = None
    if config.shapes_vqa and config.accuracy_questions:
        with _stage(result, f"accuracy ({config.accuracy_questions} questions, both engines)"):
            accuracy = _accuracy(config, pipes, progress)
    with _stage(result, "latency report"):
        latency = latency_report(pipes["pruned"], pipes["unpruned"], out / "report", image=out / "sample.png",
                                 rounds=config.latency_rounds)
    _plots(pipes["pruned"], out, result.question, answers["pruned"].kept_indices, parity)
    del pipes
    free_device_memory()
    return parity, latency, accuracy


def free_device_memory() -> None:
    """Collect what the last stage dropped (engines, references: cycles keep some alive) and, where PyTorch has
    initialised CUDA, return its cached blocks to the device so the next stage's engine can take them. Never
    imports torch itself: the ONNX Runtime path may run without it."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _plots(pipe, out: Path, question: str, kept: dict[int, list[int]], parity: ParityReport) -> None:
    from reports.plots import model_view, plot_kept_tokens, plot_parity

    _, pixel_values = pipe.encode(out / "sample.png", pipe.chat_prompt(question))
    shown = pipe.num_visual if not pipe.anyres else pixel_values.shape[-1] ** 2 // pipe.processor.patch_size ** 2
    plot_kept_tokens(model_view(pixel_values, pipe.processor), kept, shown, out / "report" / "kept_tokens.png")
    plot_parity(parity, out / "report" / "parity.png")


def _headline(out: Path, parity: ParityReport, latency: LatencyReport) -> dict[str, Any]:
    from calibrate.recipe import load_recipe

    recipe = load_recipe(out / "recipe.json")
    ratios = latency.ratios
    return {
        "visual_tokens": f"{recipe.num_visual_tokens} -> {recipe.keep[-1]}",
        "visual_flops_reduction": recipe.achieved["visual_flops_reduction"],
        "lm_flops_ratio": ratios.lm_flops_ratio, "prefill_latency_ratio": ratios.prefill_latency_ratio,
        "prefill_speedup": ratios.prefill_speedup, "kv_bytes_ratio": ratios.kv_bytes_ratio,
        "parity_passed": parity.engine_vs_reference.passed,
        "max_abs_logits_error": parity.engine_vs_reference.max_abs_logits_error,
        "first_token_top1_agreement": parity.pruned_vs_unpruned.first_token_top1_agreement,
    }


def report_markdown(result: PipelineResult, parity: ParityReport, latency: LatencyReport) -> str:
    f, e = result.figures, latency.engines["pruned"]
    stages = "\n".join(f"| {name} | {seconds:.1f} |" for name, seconds in result.stage_seconds.items())
    return f"""# visprune pipeline report

Engine: {e['backend']} on {e['device']} ({e['dtype']}), recipe {e['recipe_method']}: visual tokens {f['visual_tokens']}
(visual-FLOPs reduction {f['visual_flops_reduction']:.1%}).

| figure | value |
|---|---:|
| whole-LM FLOPs ratio (pruned / unpruned) | {f['lm_flops_ratio']:.3f} |
| prefill latency ratio (p50) | {f['prefill_latency_ratio']:.3f} |
| prefill speedup | {f['prefill_speedup']:.2f}x |
| KV-cache bytes ratio | {f['kv_bytes_ratio']:.3f} |
| parity vs. PyTorch | {'passed' if f['parity_passed'] else 'FAILED'} (max abs logits error {f['max_abs_logits_error']:.1e}) |
| first-token top-1 agreement, pruned vs. unpruned | {f['first_token_top1_agreement']:.0%} |

## Sample request

{_sample_markdown(result)}{_accuracy_markdown(f.get("accuracy"))}
## Visual tokens per layer

![tokens per layer](recipe.png)

## Kept tokens on the sample image

![kept tokens](report/kept_tokens.png)

## Latency vs. FLOPs

![latency](report/latency.png)

Details and method: [report/latency.md](report/latency.md).

## Parity

![parity](report/parity.png)

Details: [report/parity.md](report/parity.md).

## Stage wall times (s)

| stage | seconds |
|---|---:|
{stages}
"""


def _sample_markdown(result: PipelineResult) -> str:
    rows = [("question", result.question)]
    if result.expected is not None:
        rows.append(("expected answer", result.expected))
    rows += [("pruned engine's answer", result.answer), ("unpruned engine's answer", result.unpruned_answer)]
    table = "\n".join(f"| {name} | {_cell(value)} |" for name, value in rows)
    return f"![sample image](sample.png)\n\n| | |\n|---|---|\n{table}\n"


def _cell(text: str) -> str:
    """`text` quoted as one markdown table cell (an engine's answer may hold anything)."""
    return '"' + text.replace("|", "\\|").replace("\n", " ") + '"'


def _accuracy_markdown(accuracy: dict[str, Any] | None) -> str:
    if accuracy is None:
        return ""
    pruned, unpruned = accuracy["pruned"], accuracy["unpruned"]

    def cell(value: float, ci95: list[float]) -> str:
        return f"{value:.1%} [{ci95[0]:.1%}, {ci95[1]:.1%}]"

    rows = [f"| all | {pruned['n']} | {cell(pruned['overall'], pruned['ci95'])} | "
            f"{cell(unpruned['overall'], unpruned['ci95'])} |"]
    rows += [f"| {t} | {v['n']} | {cell(v['accuracy'], v['ci95'])} | "
             f"{cell(unpruned['per_type'][t]['accuracy'], unpruned['per_type'][t]['ci95'])} |"
             for t, v in pruned["per_type"].items()]
    table = "\n".join(rows)
    return f"""
## shapes-vqa accuracy, pruned vs. unpruned engine

Held-out shapes-vqa {_question_range(accuracy)}, answered through the two built engines, greedy, scored as
`visprune eval --engine` scores (first word, exact match). In brackets: the 95 % Wilson interval. On a sample
this small only wide gaps are real; `visprune eval --engine DIR --questions 500` measures one engine closer.

| question type | n | pruned engine | unpruned engine |
|---|---:|---:|---:|
{table}
"""


class InBackground:
    """`fn(*args)` in a spawned process. `result()` waits and re-raises its error; leaving the block early (an
    error here) terminates it, so a failed run does not wait for work nobody will use."""

    def __init__(self, fn: Callable, *args: Any, cleanup: Callable[[], None] = lambda: None):
        self._cleanup = cleanup  # removes what a terminated child leaves half-written
        context = multiprocessing.get_context("spawn")  # no fork: torch and ORT thread pools do not survive it
        self._receive, self._send = context.Pipe(duplex=False)
        self._process = context.Process(target=_call_and_send, args=(self._send, fn, args), daemon=True)

    def __enter__(self) -> "InBackground":
        self._process.start()
        self._send.close()  # the child holds the only writer now, so recv() sees its death as EOF
        return self

    def result(self) -> Any:
        try:
            ok, value = self._receive.recv()
        except EOFError:
            ok, value = False, RuntimeError(f"the background process died (exit code {self._process.exitcode})")
        self._process.join()
        if not ok:
            raise value
        return value

    def __exit__(self, *exc) -> bool:
        stopped_early = self._process.is_alive()
        if stopped_early:
            self._process.terminate()
        self._process.join()
        if stopped_early:
            self._cleanup()
        return False


def _remove_staging(out: Path) -> None:
    """What the terminated baseline process was writing: its staging folders (its PID is dead now)."""
    from visprune.outputs import recover_interrupted

    for name in ("onnx-unpruned", "engine-unpruned"):
        recover_interrupted(out / name)


def _call_and_send(send, fn: Callable, args: tuple) -> None:
    from visprune.logs import quiet_third_party_logs

    quiet_third_party_logs(verbose=False)
    try:
        send.send((True, fn(*args)))
    except BaseException as e:  # every failure goes back to the parent, which raises it
        try:
            send.send((False, e))
        except Exception:  # an exception that does not pickle
            send.send((False, RuntimeError(f"{type(e).__name__}: {e}")))


class _stage:
    """Times a block into result.stage_seconds."""

    def __init__(self, result: PipelineResult, name: str):
        self.result, self.name = result, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.result.stage_seconds[self.name] = round(time.perf_counter() - self.start, 2)
        return False
