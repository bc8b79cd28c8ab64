"""The method registry (visprune/methods.py): what every stage reads about a method, and the rules recipes follow."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
import torch

from calibrate import CalibrationConfig, calibrate
from calibrate.baselines import counts_recipe
from calibrate.flops import visual_flops_reduction
from calibrate.recipe import Recipe, recipe_from_dict
from calibrate.stage import budget_recipe
from conftest import REPO, TINY_RECIPE_60
from exporter import selection
from visprune.errors import ConfigError, RecipeError
from visprune.methods import MAIN_METHODS, METHOD_NAMES, METHODS, PRUNING_METHODS, method

REDUCTION = 0.6


def test_every_method_names_a_selection_function():
    assert METHODS["none"].selection == "" and METHODS["none"].schedule == "none"
    for name in PRUNING_METHODS:
        spec = METHODS[name]
        function = getattr(selection, spec.selection, None)
        assert callable(function), f"{name}: exporter/selection.py has no {spec.selection!r}"
        parameters = inspect.signature(function).parameters
        assert list(parameters)[:2] == ["v", "keep"], name
        assert set(spec.params) <= set(parameters), f"{name}: params {spec.params} not accepted"


def test_the_registry_lists_are_consistent():
    assert set(METHOD_NAMES) == set(METHODS) and "none" not in PRUNING_METHODS
    assert set(MAIN_METHODS) == {n for n in PRUNING_METHODS if not METHODS[n].ablation}
    assert {"fitprune", "fastv", "random", "dart", "divprune", "visionzip"} <= set(MAIN_METHODS)
    assert {n for n in METHODS if METHODS[n].pre_llm} == {"divprune", "visionzip"}
    assert {n for n in METHODS if METHODS[n].vision_score} == {"visionzip"}
    assert {n for n in METHODS if METHODS[n].needs_seed} == {"random"}
    assert not any(METHODS[n].pre_llm and METHODS[n].needs_attention for n in METHODS)  # no LLM attention yet


def selection_point(with_probs: bool) -> selection.SelectionInputs:
    g = torch.Generator().manual_seed(0)
    batch, prefix, n, text, heads = 1, 2, 24, 5, 2
    seq = prefix + n + text
    probs = torch.softmax(torch.randn(batch, heads, seq, seq, generator=g), dim=-1) if with_probs else None
    probs = None if probs is None else probs[..., prefix:prefix + n]  # the visual keys' columns, as the prefill gives
    return selection.SelectionInputs(torch.full((batch,), prefix), torch.arange(n).unsqueeze(0), torch.randn(batch, seq, 8, generator=g),
                                     probs, torch.randn(batch, 1, seq, 4, generator=g),
                                     torch.rand(n, generator=g), torch.rand(batch, n, generator=g),
                                     next_keys=torch.randn(batch, seq, 4, generator=g), num_visual=25)


@pytest.mark.parametrize("name", PRUNING_METHODS)
def test_needs_attention_says_whether_the_selection_reads_attention_probabilities(name):
    """Methods without the flag must run without probabilities (fused attention kernels give none); methods with
    it must actually read them."""
    spec = METHODS[name]
    function = getattr(selection, spec.selection)
    assert function(selection_point(True), 5, **spec.params).shape == (1, 5)
    if spec.needs_attention:
        with pytest.raises((TypeError, AttributeError)):
            function(selection_point(False), 5, **spec.params)
    else:
        assert function(selection_point(False), 5, **spec.params).shape == (1, 5)


def in_llm_dict(name: str, **extra) -> dict:
    return {"method": name, "num_visual_tokens": 576, "removed": [100, 20, 0, 0, 0, 0, 0, 0], **extra}


def pre_llm_dict(name: str, **extra) -> dict:
    return {"method": name, "num_visual_tokens": 576, "removed": [0] * 8, "removed_before_llm": 120, **extra}


@pytest.mark.parametrize("name", [n for n in PRUNING_METHODS if METHODS[n].needs_seed])
def test_seeded_methods_fail_validation_without_a_seed(name):
    valid = pre_llm_dict if METHODS[name].pre_llm else in_llm_dict
    with pytest.raises(RecipeError, match="needs a 'seed'") as info:
        recipe_from_dict(valid(name))
    assert "\nHint: " in str(info.value)
    assert recipe_from_dict(valid(name, seed=0)).seed == 0


@pytest.mark.parametrize("name", [n for n in PRUNING_METHODS if not METHODS[n].needs_seed])
def test_unseeded_methods_need_no_seed(name):
    valid = pre_llm_dict if METHODS[name].pre_llm else in_llm_dict
    assert recipe_from_dict(valid(name)).method == name


@pytest.mark.parametrize("name", PRUNING_METHODS)
def test_pre_llm_methods_reject_in_llm_counts_and_vice_versa(name):
    seed = {"seed": 0} if METHODS[name].needs_seed else {}
    if METHODS[name].pre_llm:
        good = recipe_from_dict(pre_llm_dict(name, **seed))
        assert good.total_removed == 120 and good.keep == [456] * 8
        bad = [in_llm_dict(name, **seed),  # counts inside the LLM only
               in_llm_dict(name, removed_before_llm=120, **seed)]  # both
        where = "before the LLM only"
    else:
        good = recipe_from_dict(in_llm_dict(name, **seed))
        assert good.removed_before_llm == 0 and good.keep[-1] == 456
        bad = [pre_llm_dict(name, **seed), in_llm_dict(name, removed_before_llm=120, **seed)]
        where = "inside the LLM only"
    for data in bad:
        with pytest.raises(RecipeError, match=where) as info:
            recipe_from_dict(data)
        assert "\nHint: " in str(info.value) and f"--method {name}" in info.value.hint


def test_an_unknown_method_is_a_config_error_with_a_hint():
    with pytest.raises(ConfigError, match="Unknown method 'nosuch'") as info:
        method("nosuch")
    assert all(name in info.value.hint for name in PRUNING_METHODS)
    with pytest.raises(ConfigError, match="nosuch"):
        CalibrationConfig(method="nosuch")
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(in_llm_dict("nosuch"))
    assert "Hint:" in str(info.value)


def test_the_cli_rejects_an_unknown_method_with_exit_2_and_a_hint(tmp_path):
    out = tmp_path / "recipe.json"
    result = subprocess.run([sys.executable, "-m", "cli", "calibrate", "--method", "nosuch", "--reduction", "0.6",
                             "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert any("invalid choice: 'nosuch' (choose from 'fitprune', 'fastv', 'random', 'dart', 'divprune', "
               "'visionzip'" in line for line in lines), result.stderr
    assert lines[-1].startswith("Hint: run `visprune calibrate --help`")
    assert "Traceback" not in result.stderr and not out.exists() and list(tmp_path.iterdir()) == []


# ---- every method's recipe at the same budget --------------------------------------------------------------


def arithmetic_recipes(tiny) -> dict:
    """Each pruning method's recipe at 60 % on tiny without running a model: the budget-only methods from the
    budget, the others on the counts of the calibrated 60 % FitPrune recipe written down in conftest."""
    fitprune = Recipe("fitprune", 576, list(TINY_RECIPE_60), reduction_target=REDUCTION)
    made = {"fitprune": fitprune}
    for name in PRUNING_METHODS:
        if not METHODS[name].needs_calibration:
            made[name] = budget_recipe(tiny.shape, REDUCTION, name)
        elif name != "fitprune":
            made[name] = counts_recipe(fitprune, name, seed=0)
    return made


def calibrated_recipes(tiny, root) -> dict:
    """Each pruning method's recipe at 60 % on tiny as `calibrate` writes it: FitPrune's search on a few samples,
    the budget-only methods through `calibrate` too, the methods on FitPrune's counts from that search's recipe
    (what `calibrate` does after its own search; one of them is also calibrated, to check just that)."""

    def run(name):
        config = CalibrationConfig(model="tiny", method=name, reduction=REDUCTION, samples=4, seed=0, device="cpu")
        return calibrate(config, root / f"{name}.json", plot=False, progress=False).recipe

    made = {"fitprune": run("fitprune")}
    for name in PRUNING_METHODS:
        if not METHODS[name].needs_calibration:
            made[name] = run(name)
        elif name != "fitprune":
            made[name] = counts_recipe(made["fitprune"], name, seed=0)
    calibrated = run("fitprune-self")
    assert calibrated.method == "fitprune-self" and calibrated.removed == made["fitprune"].removed
    assert calibrated.search["counts_from"] == "fitprune" and calibrated.alpha is None
    return made


@pytest.fixture(scope="module", params=["arithmetic", pytest.param("calibrated", marks=pytest.mark.slow)])
def recipes(request, tiny, tmp_path_factory):
    if request.param == "arithmetic":
        return arithmetic_recipes(tiny)
    return calibrated_recipes(tiny, tmp_path_factory.mktemp("recipes"))


def test_every_pruning_method_meets_the_budget_and_barely_overshoots(recipes, tiny):
    assert set(PRUNING_METHODS) <= set(recipes)
    for name in PRUNING_METHODS:
        recipe = recipes[name]
        achieved = visual_flops_reduction(tiny.shape, recipe.removed, recipe.removed_before_llm,
                                          METHODS[name].cuts_after_layer)
        assert REDUCTION <= achieved <= REDUCTION + 0.01, (name, achieved)
        if recipe.achieved:  # recorded by calibrate and the budget builders
            assert recipe.achieved["visual_flops_reduction"] == pytest.approx(achieved, abs=1e-6), name
        assert recipe.method == name and recipe.reduction_target == REDUCTION
        assert recipe_from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe  # a valid recipe file


def test_each_schedule_puts_the_cut_where_it_says(recipes, tiny):
    fitprune = recipes["fitprune"]
    for name in PRUNING_METHODS:
        spec, recipe = METHODS[name], recipes[name]
        if spec.pre_llm:
            assert recipe.removed_before_llm > 0 and not any(recipe.removed), name
        elif spec.schedule == "one_layer":
            assert recipe.removed_before_llm == 0 and sum(1 for r in recipe.removed if r) == 1, name
            assert recipe.removed[1] > 0, name  # after layer 1's attention: before layer 2, as FastV
        else:  # FitPrune's own counts
            assert recipe.removed == fitprune.removed and recipe.removed_before_llm == 0, name
        assert recipe.search.get("selection", spec.selection) == spec.selection, name


def test_fewer_removed_tokens_would_miss_the_budget(recipes, tiny):
    """The budget-only methods take the smallest count that meets the budget."""
    for name in PRUNING_METHODS:
        spec, recipe = METHODS[name], recipes[name]
        if spec.pre_llm:
            assert visual_flops_reduction(tiny.shape, recipe.removed, recipe.removed_before_llm - 1) < REDUCTION
        elif spec.schedule == "one_layer":
            fewer = [r - 1 if r else 0 for r in recipe.removed]
            assert visual_flops_reduction(tiny.shape, fewer, after_layer=METHODS[name].cuts_after_layer) < REDUCTION
    assert budget_recipe(tiny.shape, REDUCTION, "divprune").removed_before_llm == recipes["divprune"].removed_before_llm
