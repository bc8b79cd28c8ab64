"""Φ against hand-computed LLaVA-1.5-7B values and the FitPrune paper's shipped recipes."""

import json

import pytest

from calibrate.flops import layer_cost, lm_flops_reduction, visual_flops, visual_flops_reduction
from calibrate.recipe import check_recipe_fits, load_recipe
from conftest import REPO
from visprune.models.llava import LanguageModelShape, llava_1_5_7b_config

SHAPE_7B = LanguageModelShape.from_config(llava_1_5_7b_config())
D, M, N = 4096, 11008, 576

# pruning_methods.md §1.4: visual-only reduction under the reference code's Φ, and the whole-LM reduction
# with 75 non-visual tokens, for the shipped LLaVA-1.5-7B recipes.
SHIPPED = {10: (6.4, 5.7), 20: (15.3, 13.6), 30: (27.9, 24.8), 40: (38.8, 34.5), 50: (49.7, 44.1),
           55: (54.5, 48.4), 60: (59.7, 53.0), 70: (69.7, 61.9), 80: (79.7, 70.7), 90: (89.7, 79.6)}


def test_7b_shape_is_read_from_the_config():
    assert SHAPE_7B == LanguageModelShape(num_layers=32, hidden_size=D, intermediate_size=M, num_heads=32,
                                          num_kv_heads=32, num_visual_tokens=N)


def test_unpruned_phi_matches_the_reference_formula():
    hand = 32 * (4 * N * D**2 + 2 * N**2 * D + 3 * N * D * M)
    assert visual_flops(SHAPE_7B, []) == hand == 3_817_152_184_320


def test_split_accounting_at_a_pruning_layer():
    # 14 tokens pruned at layer 0: q/k/v and attention on 576, o_proj and MLP on 562
    hand = 3 * 576 * D**2 + 2 * 576**2 * D + 562 * D**2 + 3 * 562 * D * M
    assert layer_cost(SHAPE_7B, 576, 562) == hand
    assert visual_flops(SHAPE_7B, [14]) == hand + 31 * layer_cost(SHAPE_7B, 562, 562)


@pytest.mark.parametrize("ratio", sorted(SHIPPED))
def test_shipped_recipes_validate_and_reproduce_the_published_reductions(ratio):
    recipe = load_recipe(REPO / "recipes" / "llava-1.5-7b" / f"fitprune-{ratio:02d}.json")
    check_recipe_fits(recipe, SHAPE_7B)
    visual, whole = SHIPPED[ratio]
    assert 100 * visual_flops_reduction(SHAPE_7B, recipe.removed) == pytest.approx(visual, abs=0.05)
    assert 100 * lm_flops_reduction(SHAPE_7B, recipe.removed, 75) == pytest.approx(whole, abs=0.05)


def test_shipped_recipe_files_are_minimal_hand_written_json():
    data = json.loads((REPO / "recipes/llava-1.5-7b/fitprune-60.json").read_text())
    assert "schema_version" not in data and "keep" not in data  # hand-written: the loader derives the rest
    assert sum(data["removed"]) == 449


def test_gqa_shrinks_the_kv_projection_term():
    gqa = LanguageModelShape(1, 64, 128, num_heads=8, num_kv_heads=2, num_visual_tokens=10)
    assert layer_cost(gqa, 10, 10) == 10 * 64 * (64 + 2 * 16) + 2 * 100 * 64 + 10 * 64 * 64 + 3 * 10 * 64 * 128
