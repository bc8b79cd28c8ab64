"""Recipes for every method that is not FitPrune's own search, at an equal FLOPs budget, exported through the same
code as FitPrune's (paper Fig. 5 and 9). Which builder a method uses is its schedule (visprune/methods.py).

- `one_layer_recipe`: one cut, as FastV (pruning_methods.md §2.2) prunes before layer K (2 by default). In our
  recipe terms that is one deletion count at layer K-1, taken after its attention: the kept tokens compute
  exactly what FastV computes, and the dropped ones skip layer K-1's output projection and MLP, which only ever
  fed themselves. The count is the smallest that meets the visual-only FLOPs reduction under the same
  accounting FitPrune recipes are fitted with. Where a cut before layer K cannot reach the budget (on a shallow
  model: the tiny ones have 8 layers, LLaVA-1.5-7B 32), the cut moves to the latest earlier layer that can,
  and the recipe records where. FastV, DART and the one-cut FitPrune ablation use it. AdaptPrune too, with its
  cut after the whole layer K-1 (visprune/methods.py `cut_after`): the count is the same deletion at layer K-1,
  charged that layer's output projection and MLP for every token.
- `pre_llm_recipe`: the smallest count removed before the first layer that meets the budget (DivPrune,
  VisionZip).
- `counts_recipe`: FitPrune's per-layer counts with another selection: random survivors ("FitPrune(Random)" in
  the paper, seeded) and the score ablations.
"""

from __future__ import annotations

from dataclasses import replace

from calibrate.flops import visual_flops_reduction
from calibrate.recipe import Recipe
from visprune.errors import BudgetUnreachableError
from visprune.methods import METHODS
from visprune.models.llava import LanguageModelShape

FASTV_LAYER = 2


def one_layer_recipe(shape: LanguageModelShape, reduction: float, method: str = "fastv",
                     layer: int = FASTV_LAYER) -> Recipe:
    """The recipe pruning once before `layer` (or, if that cannot reach `reduction`, the latest earlier layer
    that can) with the fewest tokens removed that meet `reduction`."""
    after_layer = METHODS[method].cuts_after_layer
    last = shape.num_layers - 1 if after_layer else shape.num_layers  # it reads the next layer
    for cut in range(min(layer, last), 0, -1):
        schedule = [0] * shape.num_layers
        for removed in range(1, shape.num_visual_tokens):
            schedule[cut - 1] = removed
            if visual_flops_reduction(shape, schedule, after_layer=after_layer) >= reduction:
                return _budget_recipe(shape, method, reduction, schedule, 0,
                                      {"cut_before_layer": cut, "asked_cut_before_layer": layer})
    best = visual_flops_reduction(shape, schedule, after_layer=after_layer)
    raise BudgetUnreachableError(
        f"One cut before layer 1 removes at most {best:.1%} of the visual-token FLOPs (keeping one token); "
        f"{reduction:.0%} was asked for.", f"Ask for at most {int(best * 100) / 100:.2f}.")


def fastv_recipe(shape: LanguageModelShape, reduction: float, layer: int = FASTV_LAYER) -> Recipe:
    return one_layer_recipe(shape, reduction, "fastv", layer)


def pre_llm_recipe(shape: LanguageModelShape, reduction: float, method: str) -> Recipe:
    """The recipe removing the fewest tokens before the first layer that still meets `reduction`."""
    schedule = [0] * shape.num_layers
    for removed in range(1, shape.num_visual_tokens):
        if visual_flops_reduction(shape, schedule, removed) >= reduction:
            return _budget_recipe(shape, method, reduction, schedule, removed, {"cut_before_layer": 0})
    raise BudgetUnreachableError(f"{reduction:.0%} of the visual-token FLOPs cannot be removed while keeping one token.",
                                 "Ask for a smaller --reduction.")


def _budget_recipe(shape: LanguageModelShape, method: str, reduction: float, schedule: list[int], before: int,
                   search: dict) -> Recipe:
    recipe = Recipe(method=method, num_visual_tokens=shape.num_visual_tokens, removed=list(schedule),
                    reduction_target=reduction, removed_before_llm=before,
                    search={**search, "selection": METHODS[method].selection})
    achieved = visual_flops_reduction(shape, schedule, before, METHODS[method].cuts_after_layer)
    recipe.achieved = {"visual_flops_reduction": round(achieved, 6)}
    return recipe


def counts_recipe(recipe: Recipe, method: str, seed: int | None = None) -> Recipe:
    """`recipe`'s per-layer counts with `method`'s selection (seeded where the method draws at random)."""
    return replace(recipe, method=method, seed=seed if METHODS[method].needs_seed else recipe.seed, alpha=None,
                   search={**recipe.search, "counts_from": recipe.method, "selection": METHODS[method].selection})


def random_recipe(recipe: Recipe, seed: int) -> Recipe:
    """`recipe`'s per-layer counts with seeded random survivors."""
    return counts_recipe(recipe, "random", seed)
