"""The recipe artifact: parsing, validation against a model, and its byte-stable file form."""

import json

import pytest

from calibrate.recipe import Recipe, check_recipe_fits, load_recipe, recipe_from_dict, save_recipe
from visprune.errors import RecipeError
from visprune.models.llava import LanguageModelShape

SHAPE = LanguageModelShape(num_layers=4, hidden_size=64, intermediate_size=176, num_heads=4, num_kv_heads=4,
                           num_visual_tokens=10)


def minimal(**overrides):
    return {"method": "fitprune", "num_visual_tokens": 10, "removed": [2, 3, 0, 1], **overrides}


def test_hand_written_minimal_recipe_loads_and_derives_keep():
    recipe = recipe_from_dict(minimal())
    assert recipe.keep == [8, 5, 5, 4]
    check_recipe_fits(recipe, SHAPE)


@pytest.mark.parametrize("data, fragment", [
    ({"removed": [1]}, "method: Field required; num_visual_tokens: Field required"),
    (minimal(method="fastv-ish"), "method: Input should be 'none', 'fitprune', 'fastv', 'random', 'dart', 'divprune'"),
    (minimal(method="divprune"), r"divprune removes tokens before the LLM only \('removed_before_llm'\)"),
    (minimal(removed_before_llm=3), r"fitprune removes tokens inside the LLM only \('removed'\)"),
    (minimal(removed=[2, -1, 0, 0]), "removed.1: Input should be greater than or equal to 0"),
    (minimal(removed=[5, 5, 0, 0]), "deletes 10 of 10"),
    (minimal(keep=[8, 5, 5, 3]), "'keep' does not match"),
    (minimal(schema_version=99), "schema_version 99"),
    ([1, 2, 3], "not a JSON object"),
])
def test_malformed_recipes_are_rejected_with_a_hint(data, fragment):
    with pytest.raises(RecipeError, match=fragment) as info:
        recipe_from_dict(data)
    assert "Hint:" in str(info.value)


def test_recipe_for_another_model_is_rejected():
    with pytest.raises(RecipeError, match="8 layers|model has 4 layers"):
        check_recipe_fits(recipe_from_dict(minimal(removed=[0] * 8)), SHAPE)
    other = recipe_from_dict(minimal(model={"fingerprint": "sha256:other"}))
    with pytest.raises(RecipeError, match="fingerprint"):
        check_recipe_fits(other, SHAPE, fingerprint="sha256:this")


def test_save_and_load_round_trip_is_byte_stable(tmp_path):
    recipe = recipe_from_dict(minimal(reduction_target=0.5, alpha=0.25, seed=3))
    save_recipe(recipe, tmp_path / "a.json")
    save_recipe(load_recipe(tmp_path / "a.json"), tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["schema"] == "visprune.recipe" and data["schema_version"] == 1
    assert data["keep"] == [8, 5, 5, 4] and data["num_layers"] == 4


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(RecipeError, match="No recipe at .*missing.json"):
        load_recipe(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_recipe(tmp_path / "bad.json")


def test_content_hash_changes_with_the_counts():
    assert Recipe("fitprune", 10, [1, 0]).content_hash() != Recipe("fitprune", 10, [0, 1]).content_hash()
