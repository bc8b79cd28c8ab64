"""The committed accuracy-vs-FLOPs table (docs/tradeoff) is reproducible, and the properties it shows hold."""

import json

import pytest

from calibrate import CalibrationConfig, calibrate
from conftest import REPO
from runtime.evaluate import EvalConfig, answers_from_recipe, eval_report
from runtime.tradeoff import accuracy_table
from visprune.tasks.shapes_vqa import accuracy_by_type, make_split

TABLE = json.loads((REPO / "docs" / "tradeoff" / "tradeoff.json").read_text())


def row(method, reduction):
    return next(r for r in TABLE["rows"] if r["method"] == method and r["reduction_target"] == reduction)


@pytest.fixture(scope="module")
def fitprune_60(tmp_path_factory):
    out = tmp_path_factory.mktemp("tradeoff") / "fitprune-0.60.json"
    # on CPU, as the committed table was made: `auto` would calibrate in float16 on a GPU host
    config = CalibrationConfig(model="tiny-vqa", reduction=0.6, seed=TABLE["config"]["seed"], device="cpu")
    return calibrate(config, out, plot=False, progress=False)


@pytest.mark.slow
def test_the_60_percent_fitprune_figures_reproduce(fitprune_60):
    expected = row("fitprune", 0.6)
    assert fitprune_60.recipe.removed == expected["removed"]
    samples = make_split("test", TABLE["questions"])
    answers = answers_from_recipe("tiny-vqa", fitprune_60.recipe, samples, EvalConfig(questions=TABLE["questions"]))
    assert accuracy_by_type(samples, answers) == expected["accuracy"]


def test_the_committed_table_is_complete():
    table = accuracy_table(TABLE)
    assert set(table) == {"fitprune", "fastv", "random"} and TABLE["questions"] >= 500
    assert all(table[m].keys() == {0.0, 0.4, 0.6, 0.8, 0.9} for m in table)
    assert (REPO / "docs" / "tradeoff" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_eval_report_on_a_recipe(fitprune_60, tmp_path):
    report = eval_report(tmp_path, EvalConfig(questions=25), recipe=fitprune_60.recipe_path, progress=False)
    assert report["schema"] == "visprune.eval_report" and report["accuracy"]["n"] == 25
    assert set(report["accuracy"]["per_type"]) == {"colour", "shape", "count", "exists", "side"}
    assert (tmp_path / "eval.md").read_text().startswith("# shapes-vqa accuracy")
