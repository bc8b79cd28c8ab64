"""The tokens-per-layer plot and table: pre-LLM methods drop their tokens before layer 0, in-LLM ones inside."""

from __future__ import annotations

import pytest

from calibrate.baselines import pre_llm_recipe
from calibrate.inspect import inspect_recipes
from calibrate.plots import BEFORE_LLM, format_recipe_summary, plot_tokens_per_layer
from calibrate.recipe import recipe_from_dict, save_recipe
from visprune.outputs import PLOT, artifact_kind_at

from conftest import TINY_RECIPE_60


def table_rows(summary: str) -> dict[str, tuple[int, int]]:
    """{step: (removed, kept)} from the summary's chart."""
    rows = {}
    for line in summary.splitlines()[1:]:
        if not line.strip():
            break
        step, removed, kept, _bar = line.rsplit(maxsplit=3)
        rows[step.strip()] = (int(removed), int(kept))
    return rows


@pytest.mark.parametrize("method", ["divprune", "visionzip"])
def test_a_pre_llm_recipe_is_plotted_and_tabled_with_its_drop_before_layer_zero(method, tiny, tmp_path):
    recipe = pre_llm_recipe(tiny.shape, 0.6, method)
    entering = recipe.num_visual_tokens - recipe.removed_before_llm
    assert 0 < recipe.removed_before_llm and not any(recipe.removed)

    series = plot_tokens_per_layer([(method, recipe)], tmp_path / "plot.png")
    x, y = series[method]
    assert x[:2] == [-1, 0] and y[0] == recipe.num_visual_tokens  # the vision tower's output
    assert y[1:] == [entering] * recipe.num_layers  # what enters every layer: no drop inside the LLM
    assert artifact_kind_at(tmp_path / "plot.png") is PLOT

    rows = table_rows(format_recipe_summary(recipe))
    assert rows[BEFORE_LLM] == (recipe.removed_before_llm, entering)
    assert [rows[str(layer)] for layer in range(recipe.num_layers)] == [(0, entering)] * recipe.num_layers


def test_an_in_llm_recipe_enters_whole_and_has_no_before_the_llm_row(tiny, tmp_path):
    recipe = recipe_from_dict({"method": "fitprune", "num_visual_tokens": 576, "removed": TINY_RECIPE_60})
    x, y = plot_tokens_per_layer([("fitprune", recipe)], tmp_path / "plot.png")["fitprune"]
    assert x == [-1, *range(recipe.num_layers)]
    assert y == [576, 576, *recipe.keep[:-1]]
    rows = table_rows(format_recipe_summary(recipe))
    assert BEFORE_LLM not in rows
    assert [rows[str(layer)] for layer in range(recipe.num_layers)] == list(zip(TINY_RECIPE_60, recipe.keep))


def test_recipe_plot_and_summary_show_the_pre_llm_drop(tiny, tmp_path):
    """`visprune recipe --plot` (inspect_recipes), a DivPrune recipe next to a FitPrune one on one axis."""
    divprune = pre_llm_recipe(tiny.shape, 0.6, "divprune")
    fitprune = recipe_from_dict({"method": "fitprune", "num_visual_tokens": 576, "removed": TINY_RECIPE_60})
    save_recipe(divprune, tmp_path / "divprune.json")
    save_recipe(fitprune, tmp_path / "fitprune.json")
    _, summary = inspect_recipes([tmp_path / "divprune.json", tmp_path / "fitprune.json"], model="tiny",
                                 plot=tmp_path / "plot.png")
    divprune_section = summary.split("== ")[1]
    assert table_rows(divprune_section.split("\n", 1)[1])[BEFORE_LLM] == (
        divprune.removed_before_llm, 576 - divprune.removed_before_llm)
    assert f"plot: {tmp_path / 'plot.png'}" in summary


def test_a_plot_path_that_is_refused_names_the_plot_option(tmp_path):
    """`visprune recipe R --plot P`: the hints say --plot (the flag given), not --out (which `recipe` has not)."""
    from visprune.outputs import OutputLocationError

    recipe = tmp_path / "fitprune.json"
    save_recipe(recipe_from_dict({"method": "fitprune", "num_visual_tokens": 576, "removed": TINY_RECIPE_60}), recipe)
    (tmp_path / "notes.png").write_bytes(b"someone's picture")
    for plot in (tmp_path / "notes.png", recipe, recipe / "plot.png"):
        with pytest.raises(OutputLocationError) as info:
            inspect_recipes([recipe], plot=plot)
        assert "--plot" in info.value.hint and "--out" not in info.value.hint, info.value
    assert (tmp_path / "notes.png").read_bytes() == b"someone's picture"
