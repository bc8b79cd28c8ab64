"""The committed accuracy-vs-FLOPs table (docs/tradeoff) is complete and reproducible, and the study runs."""

import json

import pytest

from calibrate import CalibrationConfig, calibrate
from calibrate.stage import budget_recipe
from conftest import REPO
from reports.evaluate import EvalConfig, answers_from_recipe, eval_report
from workflows.tradeoff import ABLATIONS, TradeoffConfig, accuracy_table, tradeoff, tradeoff_markdown
from visprune.errors import ConfigError
from visprune.methods import MAIN_METHODS
from visprune.models.llava import LanguageModelShape, load_llava_config
from visprune.tasks.shapes_vqa import accuracy_by_type, make_split, wilson_interval

TABLE = json.loads((REPO / "docs" / "tradeoff" / "tradeoff.json").read_text())


def row(method, reduction):
    return next(r for r in TABLE["rows"] if r["method"] == method and r["reduction_target"] == reduction)


def test_the_committed_table_covers_every_method_budget_and_ablation():
    config = TABLE["config"]
    assert TABLE["questions"] >= 1000 and tuple(config["methods"]) == MAIN_METHODS
    main = accuracy_table(TABLE)
    assert set(main) == set(MAIN_METHODS)
    assert all(main[m].keys() == {0.0, *config["reductions"]} for m in main)
    assert set(accuracy_table(TABLE, ablation=True)) == set(ABLATIONS)
    assert set(config["reductions"]) == {0.4, 0.6, 0.8, 0.9} and set(config["ablation_reductions"]) == {0.6, 0.8}
    assert (REPO / "docs" / "tradeoff" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_the_committed_markdown_is_what_the_code_renders_with_the_ablation_contrasts():
    markdown = (REPO / "docs" / "tradeoff" / "tradeoff.md").read_text()
    assert markdown == tradeoff_markdown(TABLE)
    assert "`fitprune-onelayer` - `fitprune`" in markdown and "`fastv` - `fitprune-lasttoken`" in markdown


def test_every_committed_cell_carries_its_wilson_interval_and_meets_its_budget():
    for r in TABLE["rows"]:
        if r["accuracy"] is None:
            continue
        cells = [{**r["accuracy"], "accuracy": r["accuracy"]["overall"]}, *r["accuracy"]["per_type"].values()]
        for cell in cells:
            hits = round(cell["accuracy"] * cell["n"])
            assert cell["ci95"] == wilson_interval(hits, cell["n"]), (r["method"], r["reduction_target"])
            assert cell["ci95"][0] <= cell["accuracy"] <= cell["ci95"][1]
        assert r["visual_flops_reduction"] >= r["reduction_target"]  # the budget is met, never stretched
        assert r["accuracy"]["n"] == TABLE["questions"]


@pytest.fixture(scope="module")
def fitprune_60(tmp_path_factory):
    out = tmp_path_factory.mktemp("tradeoff") / "fitprune-0.60.json"
    # on CPU, as the committed table was made: `auto` would calibrate in float16 on a GPU host
    config = CalibrationConfig(model="tiny-vqa", reduction=0.6, seed=TABLE["config"]["seed"], device="cpu")
    return calibrate(config, out, plot=False, progress=False)


def test_the_budget_methods_recipes_reproduce():
    shape = LanguageModelShape.from_config(load_llava_config("tiny-vqa"))
    for r in TABLE["rows"]:
        if r["method"] in ("fastv", "dart", "divprune", "visionzip", "fitprune-onelayer") and r["accuracy"]:
            recipe = budget_recipe(shape, r["reduction_target"], r["method"])
            assert (recipe.removed, recipe.removed_before_llm) == (r["removed"], r["removed_before_llm"])


@pytest.mark.slow
def test_the_60_percent_fitprune_figures_reproduce(fitprune_60):
    samples = make_split("test", TABLE["questions"])
    assert fitprune_60.recipe.removed == row("fitprune", 0.6)["removed"]
    answers = answers_from_recipe("tiny-vqa", fitprune_60.recipe, samples, EvalConfig(questions=len(samples)))
    assert accuracy_by_type(samples, answers) == row("fitprune", 0.6)["accuracy"]


def test_a_small_study_writes_its_table_with_na_cells(tmp_path):
    config = TradeoffConfig(reductions=(0.6, 0.95), methods=("fastv", "divprune"), ablation_reductions=(),
                            questions=10)
    report = tradeoff(config, tmp_path / "study", progress=False)
    fastv = {r["reduction_target"]: r for r in report["rows"] if r["method"] == "fastv"}
    assert fastv[0.6]["accuracy"]["n"] == 10 and fastv[0.95]["accuracy"] is None  # one cut cannot reach 95 %
    assert sorted(p.name for p in (tmp_path / "study" / "recipes").iterdir()) == [
        "divprune-0.60.json", "divprune-0.95.json", "fastv-0.60.json"]
    markdown = (tmp_path / "study" / "tradeoff.md").read_text()
    assert "| fastv |" in markdown and "n/a" in markdown and "[" in markdown  # intervals in every cell


def test_bad_study_configs_are_refused():
    with pytest.raises(ConfigError, match="Unknown methods"):
        TradeoffConfig(methods=("fitprune", "nosuch"))
    with pytest.raises(ConfigError, match="Reductions"):
        TradeoffConfig(reductions=(0.6, 1.0))


@pytest.mark.slow
def test_eval_report_on_a_recipe(fitprune_60, tmp_path):
    report = eval_report(tmp_path, EvalConfig(questions=25), recipe=fitprune_60.recipe_path, progress=False)
    assert report.schema_ == "visprune.eval_report" and report.accuracy.n == 25
    assert set(report.accuracy.per_type) == {"colour", "shape", "count", "exists", "side"}
    assert (tmp_path / "eval.md").read_text().startswith("# shapes-vqa accuracy")
