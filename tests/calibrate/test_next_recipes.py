"""The shipped LLaVA-NeXT recipes and `counts_at`: how a recipe's counts meet an image of another N."""

import json

import pytest

from calibrate.flops import visual_flops_reduction
from calibrate.recipe import check_image_fits, counts_at, load_recipe, recipe_from_dict
from conftest import REPO
from visprune.errors import RecipeError
from visprune.models.llava import LanguageModelShape

NEXT = REPO / "recipes" / "llava-v1.6-vicuna-7b"
LLAVA_1_5_60 = REPO / "recipes" / "llava-1.5-7b" / "fitprune-60.json"
# content_hash of the LLaVA-1.5 "60" recipe at 5aaf574, the commit before budget_policy existed
LLAVA_1_5_60_HASH = "sha256:175472b9fa3f346198e12be4c8dca00225b756e8aa0beddd888acb90c3217c4e"
# next_lmms_qwen.md §2.4: visual tokens left after the last pruning layer, per image N
LEFT = {2928: (1399, 807), 2880: (1368, 784), 2340: (1123, 648), 1948: (937, 543), 1176: (572, 332)}
LAST_PRUNING_LAYER = 25  # the reference tables' last non-zero count (both recipes)


def next_recipe(target: int):
    return load_recipe(NEXT / f"fitprune-{target}.json")


def left_after_pruning(recipe, n: int) -> int:
    pre, removed = counts_at(recipe, n)
    return n - pre - sum(removed)


@pytest.mark.parametrize("target", [40, 60])
def test_shipped_next_recipe_loads_as_a_ratio_recipe_for_2880_tokens(target):
    recipe = next_recipe(target)
    assert (recipe.method, recipe.num_visual_tokens, recipe.budget_policy) == ("fitprune", 2880, "ratio")
    assert recipe.num_layers == 32 and recipe.reduction_target == target / 100
    assert recipe.model["name"] == "llava-hf/llava-v1.6-vicuna-7b-hf"
    assert "fcddfbd2d1aee86cd872607c24f40d29760193e1" in recipe.calibration["description"]


@pytest.mark.parametrize("n", sorted(LEFT))
def test_counts_at_leaves_what_the_reference_leaves(n):
    left_40, left_60 = LEFT[n]
    assert (left_after_pruning(next_recipe(40), n), left_after_pruning(next_recipe(60), n)) == (left_40, left_60)
    for target in (40, 60):
        _, removed = counts_at(next_recipe(target), n)
        assert max(i for i, count in enumerate(removed) if count) == LAST_PRUNING_LAYER


@pytest.mark.parametrize("target", [40, 60])
def test_reduction_target_is_the_visual_flops_reduction_at_the_nominal_n(target):
    """The "40"/"60" keys are FitPrune's visual-FLOPs targets (about 52 % / 72 % of the tokens go)."""
    shape = LanguageModelShape(num_layers=32, hidden_size=4096, intermediate_size=11008, num_heads=32,
                               num_kv_heads=32, num_visual_tokens=2880)
    recipe = next_recipe(target)
    assert visual_flops_reduction(shape, recipe.removed) == pytest.approx(target / 100, abs=0.005)


def test_ratio_truncates_toward_zero_as_the_reference_does():
    """The reference computes `int(delete_scheme[i] * origin_img_tk_num / 2880)`: 7 tokens at N = 1176 are 2.86 -> 2
    (not 3), and a single token rounds away to 0."""
    recipe = recipe_from_dict({"method": "fitprune", "num_visual_tokens": 2880, "budget_policy": "ratio",
                               "removed": [7, 1, 5, 2879 - 13]})
    assert counts_at(recipe, 1176) == (0, [2, 0, 2, 1170])
    for n in range(1176, 2929, 7):
        assert counts_at(next_recipe(60), n)[1] == [count * n // 2880 for count in next_recipe(60).removed]


def test_budget_policy_round_trips_and_is_written_only_when_not_fixed():
    recipe = next_recipe(40)
    data = recipe.to_dict()
    assert data["budget_policy"] == "ratio"
    assert recipe_from_dict(data) == recipe and recipe_from_dict(data).content_hash() == recipe.content_hash()
    fixed = recipe_from_dict({**data, "budget_policy": "fixed"})
    assert "budget_policy" not in fixed.to_dict() and fixed.content_hash() != recipe.content_hash()


def test_llava_1_5_recipe_serialises_to_the_bytes_it_had_before_budget_policy():
    data = json.loads(LLAVA_1_5_60.read_text())
    recipe = load_recipe(LLAVA_1_5_60)
    written = recipe.to_dict()
    assert recipe.budget_policy == "fixed" and "budget_policy" not in written and "removed_before_llm" not in written
    assert {key: written[key] for key in data} == data
    assert recipe.content_hash() == LLAVA_1_5_60_HASH


def test_fixed_recipe_rejects_another_n():
    recipe = load_recipe(LLAVA_1_5_60)
    assert counts_at(recipe, 576) == (0, recipe.removed)
    with pytest.raises(RecipeError, match="images of 576 visual tokens; this one has 2340") as info:
        check_image_fits(recipe, 2340)
    assert "budget_policy 'ratio' or 'absolute'" in str(info.value)


def absolute(**fields):
    return recipe_from_dict({"method": "fitprune", "num_visual_tokens": 2880, "budget_policy": "absolute",
                             "removed": [0, 1800, 300, 0], **fields})


def kept_after_each_layer(pre: int, removed: list[int], n: int) -> list[int]:
    kept = [n - pre]
    for count in removed:
        kept.append(kept[-1] - count)
    return kept[1:]


@pytest.mark.parametrize("n", [2928, 2880, 2340, 1948, 1176, 1080])
def test_absolute_budget_keeps_the_same_counts_whatever_n(n):
    pre, removed = counts_at(absolute(), n)
    assert pre == 0 and removed[1] == n - 1080 and kept_after_each_layer(pre, removed, n) == [n, 1080, 780, 780]


def test_absolute_pre_llm_budget_moves_the_difference_to_removed_before_llm():
    recipe = recipe_from_dict({"method": "divprune", "num_visual_tokens": 2880, "budget_policy": "absolute",
                               "removed_before_llm": 2304, "removed": [0, 0, 0, 0]})
    assert counts_at(recipe, 1176) == (600, [0, 0, 0, 0])
    assert counts_at(recipe, 2928) == (2352, [0, 0, 0, 0])


def test_absolute_budget_rejects_an_image_smaller_than_its_first_kept_count():
    with pytest.raises(RecipeError, match="has 1000 visual tokens; the recipe's absolute budget keeps 1080") as info:
        check_image_fits(absolute(), 1000)
    assert "Use a larger image, or a recipe with budget_policy 'ratio'" in str(info.value)
