"""`tradeoff(config, out_dir)`: accuracy vs. visual-FLOPs reduction for FitPrune, FastV and random pruning.

For each reduction, FitPrune calibrates a recipe on the model's calibration split; random pruning reuses its
per-layer counts with seeded random survivors; FastV prunes once before layer 2 with the count that meets the
same visual-only FLOPs reduction (unreachable budgets are reported, not stretched). Every recipe is written, and
each is scored on the same held-out questions through the PyTorch reference (`runtime/evaluate.py`), which the
parity tests tie to the engines.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from calibrate import CalibrationConfig, calibrate
from calibrate.baselines import fastv_recipe, random_recipe
from calibrate.recipe import Recipe, save_recipe
from runtime.evaluate import EvalConfig, answers_from_recipe
from visprune.artifacts import atomic_write_bytes, atomic_write_json, tool_versions
from visprune.errors import BudgetUnreachableError, ConfigError
from visprune.figures import pyplot, save_figure
from visprune.models.llava import model_folder
from visprune.outputs import TRADEOFF, check_output, replacing
from visprune.tasks.shapes_vqa import accuracy_by_type, make_split

METHODS = ("fitprune", "fastv", "random")
TRADEOFF_SCHEMA = ("visprune.tradeoff", 1)


@dataclass(frozen=True)
class TradeoffConfig:
    VERSION = 1

    model: str = "tiny-vqa"
    reductions: tuple[float, ...] = (0.4, 0.6, 0.8, 0.9)  # 0 (unpruned) is always measured
    questions: int = 500
    seed: int = 0  # calibration subset seed and random pruning seed
    device: str = "cpu"  # calibration and scoring; the committed table is float32 on CPU (`cuda` calibrates in fp16)

    def __post_init__(self) -> None:
        if not all(0 < r < 1 for r in self.reductions):
            raise ConfigError(f"Reductions must lie in (0, 1): {self.reductions}.", "Use e.g. 0.4 0.6 0.8 0.9.")


def tradeoff(config: TradeoffConfig, out_dir: Path, progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Write tradeoff.json/.md/.png and every recipe to the folder `out_dir` (checked before any work, staged
    and swapped in at the end: visprune/outputs.py)."""
    out_dir = Path(out_dir)
    check_output(out_dir, TRADEOFF, inputs=[model_folder(config.model)], force=force)
    with replacing(out_dir) as staging:
        return _study(config, staging, progress)


def _study(config: TradeoffConfig, out_dir: Path, progress: bool) -> dict[str, Any]:
    samples = make_split("test", config.questions)
    evaluation = EvalConfig(questions=config.questions, device=config.device)

    def score(recipe: Recipe | None) -> dict[str, Any]:
        return accuracy_by_type(samples, answers_from_recipe(config.model, recipe, samples, evaluation, progress))

    rows = [{"method": "none", "reduction_target": 0.0, "visual_flops_reduction": 0.0, "removed": None,
             "accuracy": score(None)}]
    for reduction in config.reductions:
        for method, recipe in _recipes(config, reduction, out_dir).items():
            rows.append({"method": method, "reduction_target": reduction,
                         "visual_flops_reduction": recipe.achieved["visual_flops_reduction"] if recipe else None,
                         "removed": recipe.removed if recipe else None,
                         "accuracy": score(recipe) if recipe else None})
    report = {"schema": TRADEOFF_SCHEMA[0], "schema_version": TRADEOFF_SCHEMA[1], "model": config.model,
              "config": {"version": config.VERSION, **asdict(config)}, "questions": config.questions,
              "evaluated_through": "PyTorch reference (runtime/evaluate.py, batched greedy)", "rows": rows,
              "tools": tool_versions("torch", "transformers")}
    atomic_write_json(out_dir / "tradeoff.json", report)
    atomic_write_bytes(out_dir / "tradeoff.md", tradeoff_markdown(report).encode())
    plot_tradeoff(report, out_dir / "tradeoff.png")
    return report


def _recipes(config: TradeoffConfig, reduction: float, out_dir: Path) -> dict[str, Recipe | None]:
    """FitPrune's calibrated recipe and the two baselines at the same budget (None: unreachable)."""
    tag = f"{reduction:.2f}"
    recipes: dict[str, Recipe | None] = dict.fromkeys(METHODS)
    try:
        recipes["fitprune"] = calibrate(CalibrationConfig(model=config.model, reduction=reduction, seed=config.seed,
                                                          device=config.device),
                                        out_dir / "recipes" / f"fitprune-{tag}.json", plot=False, progress=False).recipe
        recipes["random"] = random_recipe(recipes["fitprune"], config.seed)
    except BudgetUnreachableError:
        pass  # reported as n/a
    try:
        recipes["fastv"] = fastv_recipe(_shape(config.model), reduction)
    except BudgetUnreachableError:
        pass
    for method in ("random", "fastv"):
        if recipes[method]:
            save_recipe(recipes[method], out_dir / "recipes" / f"{method}-{tag}.json")
    return recipes


def _shape(model: str):
    from visprune.models.llava import LanguageModelShape, load_llava_config

    return LanguageModelShape.from_config(load_llava_config(model))


def accuracy_table(report: dict[str, Any]) -> dict[str, dict[float, float | None]]:
    """{method: {reduction: overall accuracy}}, the unpruned accuracy at 0 for every method."""
    base = next(r for r in report["rows"] if r["method"] == "none")["accuracy"]["overall"]
    table = {m: {0.0: base} for m in METHODS}
    for row in report["rows"]:
        if row["method"] in table:
            table[row["method"]][row["reduction_target"]] = row["accuracy"]["overall"] if row["accuracy"] else None
    return table


def tradeoff_markdown(report: dict[str, Any]) -> str:
    table = accuracy_table(report)
    reductions = sorted(table["fitprune"])
    lines = [f"# Accuracy vs. visual-FLOPs reduction ({report['model']}, shapes-vqa, {report['questions']} "
             "held-out questions)", "",
             "| method | " + " | ".join(f"{r:.0%}" for r in reductions) + " |",
             "|---|" + "---:|" * len(reductions)]
    for method in METHODS:
        cells = [f"{table[method][r]:.1%}" if table[method].get(r) is not None else "n/a" for r in reductions]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "n/a: the method cannot remove that share of the visual-token FLOPs on this model (FastV prunes "
              "once, before layer 2; FitPrune's search keeps at least one token per layer).",
              f"Evaluated through the {report['evaluated_through']}; recipes in `recipes/`.", "",
              "| method | target | achieved visual-FLOPs reduction | removed per layer | " +
              " | ".join(t for t in ("colour", "shape", "count", "exists", "side")) + " |",
              "|---|---:|---:|---|" + "---:|" * 5]
    for row in report["rows"]:
        if row["accuracy"] is None:
            continue
        per_type = row["accuracy"]["per_type"]
        lines.append(f"| {row['method']} | {row['reduction_target']:.0%} | {row['visual_flops_reduction']:.3f} | "
                     f"{row['removed']} | " + " | ".join(f"{per_type[t]['accuracy']:.0%}" for t in per_type) + " |")
    return "\n".join(lines) + "\n"


def plot_tradeoff(report: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method, marker in zip(METHODS, "osD"):
        points = sorted((r, a) for r, a in accuracy_table(report)[method].items() if a is not None)
        ax.plot([100 * r for r, _ in points], [100 * a for _, a in points], marker=marker, label=method, linewidth=2)
    ax.set_xlabel("visual-token FLOPs removed (%)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"{report['model']}: accuracy vs. visual-FLOPs reduction")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out)
