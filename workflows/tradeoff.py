"""`tradeoff(config, out_dir)`: accuracy vs. visual-FLOPs reduction for every pruning method, with intervals.

For each reduction, FitPrune calibrates a recipe on the model's calibration split; the methods built on its
counts (random, the score ablations) reuse them; the others derive their counts from the same visual-only FLOPs
budget (visprune/methods.py). Every recipe is written, and each is scored on the same held-out questions through
the PyTorch reference (`reports/evaluate.py`, the modules the engines are exported from; the parity tests tie
them to the engines), the vision tower run once for all. Every accuracy carries a 95 % Wilson interval.

With `latency`, every recipe is also exported and built as an ONNX Runtime engine (CPU), and its prefill is
timed against the unpruned engine's on one request, interleaved round by round: the table then shows what the
FLOPs reduction buys in wall time at the tiny size, and what each method's export costs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from calibrate import CalibrationConfig, calibrate
from calibrate.baselines import counts_recipe
from calibrate.recipe import Recipe, save_recipe
from calibrate.stage import budget_recipe
from reports.evaluate import EvalConfig, PreparedQuestions, answers_from_recipe, prepare_questions
from visprune.artifacts import atomic_write_bytes, atomic_write_json, tool_versions
from visprune.errors import BudgetUnreachableError, ConfigError
from visprune.figures import pyplot, save_figure
from visprune.manifests import schema_ids
from visprune.methods import MAIN_METHODS, METHODS, PRUNING_METHODS
from visprune.models.llava import DEFAULT_MODEL, model_folder
from visprune.outputs import TRADEOFF, check_output, replacing
from visprune.tasks.shapes_vqa import QUESTION_TYPES, accuracy_by_type, make_split

TRADEOFF_SCHEMA = schema_ids.TRADEOFF
ABLATIONS = tuple(m for m in PRUNING_METHODS if METHODS[m].ablation)


@dataclass(frozen=True)
class TradeoffConfig:
    VERSION = 2
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"methods": PRUNING_METHODS}

    model: str = DEFAULT_MODEL
    reductions: tuple[float, ...] = (0.4, 0.6, 0.8, 0.9)  # 0 (unpruned) is always measured
    methods: tuple[str, ...] = MAIN_METHODS
    ablation_reductions: tuple[float, ...] = (0.6, 0.8)  # FitPrune's variants, at these budgets only
    questions: int = 1000
    seed: int = 0  # calibration subset seed and random pruning seed
    device: str = "cpu"  # calibration and scoring; the committed table is float32 on CPU (`cuda` calibrates in fp16)
    latency: bool = False  # export and build every recipe, time prefill on ONNX Runtime (CPU)
    latency_rounds: int = 20

    def __post_init__(self) -> None:
        if not all(0 < r < 1 for r in (*self.reductions, *self.ablation_reductions)):
            raise ConfigError(f"Reductions must lie in (0, 1): {self.reductions}.", "Use e.g. 0.4 0.6 0.8 0.9.")
        unknown = [m for m in self.methods if m not in PRUNING_METHODS]
        if unknown:
            raise ConfigError(f"Unknown methods: {', '.join(unknown)}.", f"Use any of {', '.join(PRUNING_METHODS)}.")
        if self.questions < 1 or self.latency_rounds < 1:
            raise ConfigError("--questions and --latency-rounds must be at least 1.", "Use e.g. --questions 1000.")

    def cells(self) -> list[tuple[float, str]]:
        """(reduction, method) of every pruned row, in table order."""
        main = [(r, m) for r in self.reductions for m in self.methods]
        return main + [(r, m) for r in self.ablation_reductions for m in ABLATIONS]


def tradeoff(config: TradeoffConfig, out_dir: Path, progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Write tradeoff.json/.md/.png and every recipe to the folder `out_dir` (checked before any work, staged
    and swapped in at the end: visprune/outputs.py)."""
    out_dir = Path(out_dir)
    check_output(out_dir, TRADEOFF, inputs=[model_folder(config.model)], force=force)
    with replacing(out_dir) as staging:
        return _study(config, staging, progress)


def _study(config: TradeoffConfig, out_dir: Path, progress: bool) -> dict[str, Any]:
    evaluation = EvalConfig(questions=config.questions, device=config.device)
    prepared = prepare_questions(config.model, make_split("test", config.questions), evaluation, progress)
    timer = LatencyStudy(config, out_dir / "engines") if config.latency else None
    rows = [_row("none", 0.0, None, prepared, config, evaluation, timer)]
    recipes = _recipes(config, out_dir / "recipes", progress)
    for reduction, name in config.cells():
        rows.append(_row(name, reduction, recipes.get((reduction, name)), prepared, config, evaluation, timer))
    report = {"schema": TRADEOFF_SCHEMA[0], "schema_version": TRADEOFF_SCHEMA[1], "model": config.model,
              "config": {"version": config.VERSION, **asdict(config)}, "questions": config.questions,
              "evaluated_through": "PyTorch reference (reports/evaluate.py, batched greedy)", "rows": rows,
              "tools": tool_versions("torch", "transformers", "onnxruntime")}
    atomic_write_json(out_dir / TRADEOFF_SCHEMA.file, report)
    atomic_write_bytes(out_dir / "tradeoff.md", tradeoff_markdown(report).encode())
    plot_tradeoff(report, out_dir / "tradeoff.png")
    if timer:
        timer.cleanup()
    return report


def _row(name: str, reduction: float, recipe: Recipe | None, prepared: PreparedQuestions, config: TradeoffConfig,
         evaluation: EvalConfig, timer: "LatencyStudy | None") -> dict[str, Any]:
    row = {"method": name, "reduction_target": reduction, "ablation": METHODS[name].ablation,
           "visual_flops_reduction": recipe.achieved["visual_flops_reduction"] if recipe else 0.0 if name == "none"
           else None, "removed": recipe.removed if recipe else None,
           "removed_before_llm": recipe.removed_before_llm if recipe else None, "accuracy": None}
    if recipe is None and name != "none":
        return row  # the budget is out of the method's reach: reported as n/a
    answers = answers_from_recipe(config.model, recipe, prepared.samples, evaluation, prepared=prepared)
    row["accuracy"] = accuracy_by_type(prepared.samples, answers)
    if timer and not METHODS[name].ablation:
        row.update(timer.measure(name, reduction, recipe))
    return row


def _recipes(config: TradeoffConfig, folder: Path, progress: bool) -> dict[tuple[float, str], Recipe]:
    """Every cell's recipe, written to `folder`; unreachable budgets are left out."""
    from visprune.models.llava import LanguageModelShape, load_llava_config

    shape = LanguageModelShape.from_config(load_llava_config(config.model))
    recipes: dict[tuple[float, str], Recipe] = {}
    fitprune: dict[float, Recipe | None] = {}
    for reduction, name in config.cells():
        spec = METHODS[name]
        try:
            if spec.needs_calibration and reduction not in fitprune:
                fitprune[reduction] = _calibrate_fitprune(config, reduction, folder, progress)
            if name == "fitprune":
                recipe = fitprune[reduction]
            elif spec.needs_calibration:
                recipe = counts_recipe(fitprune[reduction], name, config.seed) if fitprune[reduction] else None
            else:
                recipe = budget_recipe(shape, reduction, name)
        except BudgetUnreachableError:
            fitprune.setdefault(reduction, None)
            recipe = None
        if recipe is not None:
            save_recipe(recipe, folder / f"{name}-{reduction:.2f}.json")
            recipes[(reduction, name)] = recipe
    return recipes


def _calibrate_fitprune(config: TradeoffConfig, reduction: float, folder: Path, progress: bool) -> Recipe:
    calibration = CalibrationConfig(model=config.model, reduction=reduction, seed=config.seed, device=config.device)
    return calibrate(calibration, folder / f"fitprune-{reduction:.2f}.json", plot=False, progress=progress).recipe


class LatencyStudy:
    """Exports and builds each recipe as an ONNX Runtime engine and times its prefill against the unpruned one."""

    def __init__(self, config: TradeoffConfig, work: Path):
        self.config, self.work = config, Path(work)
        self.baseline = None  # (pipeline, its prefill call)

    def measure(self, name: str, reduction: float, recipe: Recipe | None) -> dict[str, Any]:
        from runtime.pipeline import Pipeline

        export_s, engine = self._engine(f"{name}-{reduction:.2f}", recipe)
        call = _prefill_call(Pipeline.from_engine_dir(engine))
        if self.baseline is None:
            self.baseline = call
            return {"export_s": export_s, "prefill_s": None, "prefill_latency_ratio": 1.0}
        pruned, base = self._interleaved(call, self.baseline)
        return {"export_s": export_s, "prefill_s": round(pruned, 6), "prefill_latency_ratio": round(pruned / base, 4)}

    def _engine(self, tag: str, recipe: Recipe | None) -> tuple[float, Path]:
        """(export seconds, engine folder) of `recipe` (None: unpruned)."""
        from engines import BuildConfig, build_engine
        from exporter import ExportConfig, export_onnx

        recipe_path = None
        if recipe is not None:
            recipe_path = self.work / f"{tag}.json"
            recipe_path.parent.mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, recipe_path)
        start = time.perf_counter()
        export_onnx(ExportConfig(model=self.config.model, recipe=recipe_path), self.work / f"{tag}-onnx",
                    progress=False)
        seconds = round(time.perf_counter() - start, 2)
        build_engine(BuildConfig(backend="onnxruntime"), self.work / f"{tag}-onnx", self.work / f"{tag}-engine")
        return seconds, self.work / f"{tag}-engine"

    def _interleaved(self, pruned, base) -> tuple[float, float]:
        """Median prefill seconds (pruned, unpruned): warm-up, then the two engines visited alternately."""
        times: dict[Any, list[float]] = {pruned: [], base: []}
        for _ in range(3):
            pruned(), base()
        for round_index in range(self.config.latency_rounds):
            for call in (pruned, base) if round_index % 2 == 0 else (base, pruned):
                start = time.perf_counter()
                call()
                times[call].append(time.perf_counter() - start)
        return statistics.median(times[pruned]), statistics.median(times[base])

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.work, ignore_errors=True)  # engines are large and reproducible from the recipes


def _prefill_call(pipe):
    """A call running `pipe`'s prefill on the first held-out question (inputs prepared once)."""
    sample = make_split("test", 1)[0]
    input_ids, pixel_values = pipe.encode(sample.image(), pipe.chat_prompt(sample.question))
    vision = pipe.runner.image_features(pixel_values)
    embeds, layout = pipe.embed(input_ids, vision.features)
    return lambda: pipe.runner.prefill(embeds, layout, vision.scores)


def accuracy_table(report: dict[str, Any], ablation: bool = False) -> dict[str, dict[float, float | None]]:
    """{method: {reduction: overall accuracy}} of the main methods (or the ablations), the unpruned accuracy at
    0 for every one."""
    base = next(r for r in report["rows"] if r["method"] == "none")["accuracy"]["overall"]
    table: dict[str, dict[float, float | None]] = {}
    for row in report["rows"]:
        if row["method"] != "none" and row.get("ablation", False) == ablation:
            cells = table.setdefault(row["method"], {0.0: base})
            cells[row["reduction_target"]] = row["accuracy"]["overall"] if row["accuracy"] else None
    return table


def _cell(row: dict[str, Any] | None) -> str:
    if row is None or row["accuracy"] is None:
        return "n/a"
    acc = row["accuracy"]
    low, high = acc["ci95"]
    return f"{acc['overall']:.1%} [{low:.1%}, {high:.1%}]"


def tradeoff_markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    base = next(r for r in rows if r["method"] == "none")
    find = {(r["method"], r["reduction_target"]): r for r in rows}
    config = report["config"]
    lines = [f"# Accuracy vs. visual-FLOPs reduction ({report['model']}, shapes-vqa, {report['questions']} "
             "held-out questions)", "",
             f"Unpruned: {_cell(base)}. Each cell: accuracy [95 % Wilson interval]; two cells whose intervals "
             "overlap are not told apart by this many questions.", ""]
    lines += _grid(config["methods"], config["reductions"], find)
    lines += ["", "n/a: the method cannot remove that share of the visual-token FLOPs on this model.", "",
              "## FitPrune ablations (same budgets; what costs accuracy: the schedule or the score?)", ""]
    lines += _grid(("fitprune", "random", "fastv", *ABLATIONS), config["ablation_reductions"], find)
    lines += ["", *ablation_findings(find, config["ablation_reductions"])]
    lines += ["", "## Per question type", "",
              "| method | target | achieved visual-FLOPs reduction | " + " | ".join(QUESTION_TYPES) +
              " | prefill latency ratio (ORT, CPU) | export s |", "|---|---:|---:|" + "---:|" * (len(QUESTION_TYPES) + 2)]
    for row in rows:
        if row["accuracy"] is None:
            continue
        per_type = row["accuracy"]["per_type"]
        latency = row.get("prefill_latency_ratio")
        lines.append(f"| {row['method']} | {row['reduction_target']:.0%} | {row['visual_flops_reduction']:.3f} | " +
                     " | ".join(f"{per_type[t]['accuracy']:.1%}" for t in QUESTION_TYPES if t in per_type) +
                     f" | {'' if latency is None else f'{latency:.3f}'} | {row.get('export_s', '') or ''} |")
    lines += ["", f"Evaluated through the {report['evaluated_through']}; recipes in `recipes/`."]
    return "\n".join(lines) + "\n"


# (question, the row that changes one part, the row it is compared with)
_CONTRASTS = (
    ("score, at FitPrune's counts: FastV's last-token score instead of FitPrune's", "fitprune-lasttoken", "fitprune"),
    ("score, at FitPrune's counts: random tokens instead of FitPrune's", "random", "fitprune"),
    ("score, at FitPrune's counts: the self term alone", "fitprune-self", "fitprune"),
    ("score, at FitPrune's counts: the cross term alone", "fitprune-cross", "fitprune"),
    ("score, at FitPrune's counts: heads averaged instead of max", "fitprune-headmean", "fitprune"),
    ("schedule, with FitPrune's score: one cut after layer 1 instead of FitPrune's counts", "fitprune-onelayer",
     "fitprune"),
    ("schedule, with FastV's score: one cut (FastV) instead of FitPrune's counts", "fastv", "fitprune-lasttoken"),
)


def ablation_findings(find: dict, reductions) -> list[str]:
    """Each contrast as a difference in points, marked where the two 95 % intervals do not overlap."""
    lines = ["What changing one part does (points of accuracy; * where the two 95 % intervals do not overlap):", "",
             "| change | " + " | ".join(f"{r:.0%}" for r in reductions) + " |", "|---|" + "---:|" * len(reductions)]
    for text, changed, base in _CONTRASTS:
        cells = [_difference(find.get((changed, r)), find.get((base, r))) for r in reductions]
        lines.append(f"| {text} (`{changed}` - `{base}`) | " + " | ".join(cells) + " |")
    return lines


def _difference(changed: dict | None, base: dict | None) -> str:
    if not changed or not base or not changed["accuracy"] or not base["accuracy"]:
        return "n/a"
    a, b = changed["accuracy"], base["accuracy"]
    apart = a["ci95"][0] > b["ci95"][1] or b["ci95"][0] > a["ci95"][1]
    return f"{100 * (a['overall'] - b['overall']):+.1f}{' *' if apart else ''}"


def _grid(methods, reductions, find) -> list[str]:
    lines = ["| method | " + " | ".join(f"{r:.0%}" for r in reductions) + " |", "|---|" + "---:|" * len(reductions)]
    for name in methods:
        lines.append(f"| {name} | " + " | ".join(_cell(find.get((name, r))) for r in reductions) + " |")
    return lines


def plot_tradeoff(report: dict[str, Any], out: Path) -> None:
    """Accuracy vs. reduction per method with 95 % intervals: main methods left, FitPrune's ablations right."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), dpi=120, sharey=True)
    for ax, ablation, title in zip(axes, (False, True), ("methods", "FitPrune ablations")):
        names = list(accuracy_table(report, ablation))
        if ablation:
            names = ["fitprune", "random", *names]
        for name, marker in zip(names, "osD^vPX*hp"):
            points = sorted((r["reduction_target"], r["accuracy"]) for r in report["rows"] if r["accuracy"]
                            and (r["method"] == name or r["method"] == "none"))
            xs = [100 * r for r, _ in points]
            ys = [100 * a["overall"] for _, a in points]
            errors = [[100 * (a["overall"] - a["ci95"][0]) for _, a in points],
                      [100 * (a["ci95"][1] - a["overall"]) for _, a in points]]
            ax.errorbar(xs, ys, yerr=errors, marker=marker, label=METHODS[name].title, linewidth=1.6, capsize=3)
        ax.set_xlabel("visual-token FLOPs removed (%)")
        ax.set_title(f"{report['model']}: {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"held-out accuracy (%), {report['questions']} questions, 95 % CI")
    save_figure(fig, out)
